"""``prompts build``: text prompts rendered into sound files Asterisk plays natively.

Every ``text`` prompt of every flow and menu becomes
``prompt_file(prompts_dir, flow, step, language)`` + ``.wav``: 8 kHz mono 16-bit
signed PCM, which ``format_wav`` plays without transcoding for slin. espeak-ng
speaks the text; sox resamples it (without dither, so a rebuild gives the same bytes).

``prompts_dir/manifest.json`` records, per file, the text and voice it says and the
SHA-256 of its bytes. The config loader reads the manifest to fill ``Prompt.digest``,
so the notice version logged with each call derives from the audio actually built.
A file is rebuilt only when its text, voice or tool versions change, or its bytes
no longer match the manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from consentivr.errors import ConsentivrError, StoreError
from consentivr.model import Flow, Menu, Prompt
from consentivr.paths import make_private_dir

MANIFEST = "manifest.json"
SUFFIX = ".wav"
_VOICES = {"en": "en", "nl": "nl", "de": "de", "fr": "fr"}
_TIMEOUT = 120  # seconds for one espeak-ng or sox run: a stuck tool must not hang the build


class PromptError(ConsentivrError):
    """A prompt could not be built (a tool is missing or failed)."""


def default_voice(language: str) -> str:
    """The espeak-ng voice for a language code: ``nl_BE`` -> ``nl``; override with ``voice:``."""
    base = re.split(r"[-_]", language, maxsplit=1)[0].lower()
    return _VOICES.get(base, base)


# --- the manifest -----------------------------------------------------------


def manifest_key(prompts_dir: Path, stem: Path) -> str:
    """The manifest's name for a built file: its path under ``prompts_dir``."""
    try:
        return (stem.relative_to(prompts_dir)).as_posix() + SUFFIX
    except ValueError:
        return stem.as_posix() + SUFFIX


def text_hash(text: str, voice: str) -> str:
    blob = json.dumps([text, voice], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()


def read_manifest(prompts_dir: Path) -> dict[str, dict[str, str]]:
    """The manifest, or empty when there is none or it is unreadable (then all rebuild)."""
    try:
        data = json.loads((prompts_dir / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    files = data.get("files") if isinstance(data, dict) else None
    if not isinstance(files, dict):
        return {}
    return {
        k: v for k, v in files.items()
        if isinstance(k, str) and isinstance(v, dict)
        and all(isinstance(v.get(f), str) for f in ("text_hash", "digest", "tools"))
    }


def built_digest(manifest: Mapping[str, Mapping[str, str]], prompts_dir: Path, stem: Path,
                 text: str, voice: str) -> str | None:
    """The content hash of the built file for this text and voice, if built."""
    entry = manifest.get(manifest_key(prompts_dir, stem))
    if entry is None or entry.get("text_hash") != text_hash(text, voice):
        return None
    return entry.get("digest")


def _write_manifest(prompts_dir: Path, files: Mapping[str, Mapping[str, str]]) -> None:
    blob = json.dumps({"version": 1, "files": dict(sorted(files.items()))},
                      ensure_ascii=False, indent=2) + "\n"
    _atomic_write(prompts_dir / MANIFEST, blob.encode())


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)  # Asterisk runs as another user and must read prompts
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 16), b""):
            h.update(block)
    return h.hexdigest()


# --- what to build ----------------------------------------------------------


@dataclass(frozen=True)
class TextPrompt:
    """One text to speak into one file."""

    stem: Path  # without the extension, as in the ``sound:`` URI
    text: str
    voice: str

    @property
    def path(self) -> Path:
        return self.stem.with_name(self.stem.name + SUFFIX)


def _single(prompt: Prompt) -> TextPrompt | None:
    if prompt.text is None or prompt.voice is None or len(prompt.media) != 1:
        return None
    uri = prompt.media[0]
    if not uri.startswith("sound:"):
        return None
    return TextPrompt(Path(uri.removeprefix("sound:")), prompt.text, prompt.voice)


def text_prompts(flows: Iterable[Flow], menus: Iterable[Menu] = ()) -> list[TextPrompt]:
    """Every text prompt of these flows and menus, once each, in a stable order."""

    def prompts() -> Iterator[Prompt]:
        for flow in flows:
            if flow.language_menu is not None:
                parts = flow.language_menu.parts
                yield from parts.values() if parts else (flow.language_menu.prompt,)
            yield from flow.notice.values()
            for purpose in flow.purposes:
                yield from purpose.question.values()
            yield from flow.invalid.values()
            yield from flow.not_recorded.values()
            yield from flow.more_info.values()
        for menu in menus:
            yield from menu.prompt.values()
            yield from menu.invalid.values()

    seen: dict[Path, TextPrompt] = {}
    for prompt in prompts():
        item = _single(prompt)
        if item is not None:
            seen.setdefault(item.stem, item)
    return list(seen.values())


# --- building ---------------------------------------------------------------


@dataclass(frozen=True)
class BuildResult:
    built: tuple[Path, ...]
    skipped: tuple[Path, ...]  # already up to date


def tool_versions() -> str:
    """``espeak-ng`` and ``sox`` versions; a PromptError says which one is missing."""
    versions = []
    for tool, package in (("espeak-ng", "espeak-ng"), ("sox", "sox")):
        exe = shutil.which(tool)
        if exe is None:
            raise PromptError(f"{tool} not found: install the Debian package {package} "
                              f"(apt-get install {package})")
        out = _run([exe, "--version"], f"{tool} --version")
        # Only the version number: the install path must not force a rebuild.
        found = re.search(r"\d+(?:\.\d+)+", out)
        versions.append(f"{tool} {found.group(0) if found else out.strip()[:40]}")
    return " / ".join(versions)


def _run(argv: list[str], what: str, stdin: str | None = None) -> str:
    try:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True,
                              timeout=_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise PromptError(f"{what} took longer than {_TIMEOUT} s") from None
    except OSError as exc:
        raise PromptError(f"{what} could not run: {exc.strerror}") from None
    if done.returncode != 0:
        reason = " ".join((done.stderr or done.stdout or "").split())[:200] or "no output"
        raise PromptError(f"{what} failed (exit {done.returncode}): {reason}")
    return done.stdout


def up_to_date(item: TextPrompt, entry: Mapping[str, str] | None, tools: str) -> bool:
    if entry is None or entry.get("text_hash") != text_hash(item.text, item.voice):
        return False
    if entry.get("tools") != tools:
        return False
    try:
        return file_digest(item.path) == entry.get("digest")
    except OSError:
        return False


def build_prompts(
    items: Iterable[TextPrompt],
    prompts_dir: Path,
    *,
    force: bool = False,
    progress: Callable[[TextPrompt, bool], None] | None = None,
) -> BuildResult:
    """Render every item that is not up to date; record each in the manifest.

    ``progress(item, built)`` is called after each item. The manifest is written
    after every file, so an interrupted build keeps what it finished.
    """
    items = list(items)
    tools = tool_versions() if items else ""
    manifest = read_manifest(prompts_dir)
    built: list[Path] = []
    skipped: list[Path] = []
    for item in items:
        key = manifest_key(prompts_dir, item.stem)
        if not force and up_to_date(item, manifest.get(key), tools):
            skipped.append(item.path)
            if progress:
                progress(item, False)
            continue
        digest = _render(item)
        manifest[key] = {
            "text": item.text, "voice": item.voice, "text_hash": text_hash(item.text, item.voice),
            "tools": tools, "digest": digest,
        }
        _write_manifest(prompts_dir, manifest)
        built.append(item.path)
        if progress:
            progress(item, True)
    return BuildResult(tuple(built), tuple(skipped))


def _render(item: TextPrompt) -> str:
    """Speak one text into its file; returns the file's SHA-256."""
    try:
        # 0755 whatever the umask: Asterisk (another user) reads the prompts, which
        # are the public notice; no one but us may write there.
        make_private_dir(item.path.parent, 0o755)
    except StoreError as exc:
        raise PromptError(str(exc)) from None
    with tempfile.TemporaryDirectory(prefix="consentivr-tts-") as tmp:
        spoken = Path(tmp) / "espeak.wav"
        converted = Path(tmp) / "out.wav"
        # The text goes in on stdin: a text starting with '-' is not an option then.
        _run(["espeak-ng", "-v", item.voice, "-w", str(spoken), "--stdin"],
             f"espeak-ng (voice {item.voice}) for {item.path}", stdin=item.text)
        _run(["sox", "-V1", "-D", str(spoken), "-r", "8000", "-c", "1", "-b", "16",
              "-e", "signed-integer", str(converted)], f"sox for {item.path}")
        data = converted.read_bytes()
    try:
        _atomic_write(item.path, data)
    except OSError as exc:
        raise PromptError(f"cannot write {item.path}: {exc.strerror}") from None
    return hashlib.sha256(data).hexdigest()
