"""Safe access to files under the recordings dir, for purge, withdrawal and erasure.

Only regular files strictly under the dir are touched: every path component below
it is opened with ``O_NOFOLLOW`` and a file is ``lstat``-ed and unlinked relative to
its directory's fd, so a symlink (or a symlinked dir) is never followed, and
``..``/``.``/empty components are refused. Old spellings of the dir
(``recordings.previous_dirs``) still name files under it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

from consentivr.errors import StoreError
from consentivr.text import one_line


class RecordingsUnavailable(StoreError):
    """The recordings dir cannot be opened, or looks unmounted: nothing is marked."""



def show_path(path: str) -> str:
    """A path as one printable line: odd names (newlines, quotes) are JSON-quoted."""
    return one_line(path)



class UnsafePath(Exception):
    """A recording path that must not be touched (outside the dir, ``..``, symlink...)."""


class RecordingsDir:
    """fd-relative, symlink-refusing access to files under the recordings dir.

    The configured dir itself is opened as given (an admin may point it at a
    symlinked volume); nothing below it is followed. A dir that is not there
    (a symlink to a volume not mounted) is an error as soon as a file below it
    is needed: never "every file is missing". ``previous`` are earlier spellings
    of the dir (``recordings.previous_dirs``): a row naming a file under one of
    them means the file under the dir.
    """

    def __init__(self, root: Path, previous: Sequence[str] = ()) -> None:
        self.root = Path(root)
        self.prefix = str(self.root).rstrip("/") + "/"
        # The dir as spelled, as resolved (rows written when the config loader
        # resolved symlinks), and as it was spelled before (previous_dirs).
        others = (os.path.realpath(self.root), *previous)
        self.prefixes = tuple(dict.fromkeys(
            [self.prefix, *(str(p).rstrip("/") + "/" for p in others)]))
        self.fd = -1
        try:
            self.fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            self.open_error = exc.strerror or str(exc)
        else:
            self.open_error = ""

    def need_root(self) -> None:
        """Raise :class:`RecordingsUnavailable` if the dir could not be opened."""
        if self.fd < 0:
            raise RecordingsUnavailable(
                f"{show_path(str(self.root))}: cannot open the recordings dir "
                f"({self.open_error}; a volume not mounted?): nothing was marked deleted")

    def is_empty(self) -> bool:
        if self.fd < 0:
            return True
        # A new open file description: scandir on self.fd would share its read
        # offset with the orphan walk running in another thread.
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.fd)
        try:
            with os.scandir(fd) as it:
                return next(it, None) is None
        finally:
            os.close(fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> RecordingsDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def relative(self, recording_path: str) -> tuple[str, ...]:
        """The path's components below the root, or :class:`UnsafePath`."""
        if "\0" in recording_path:
            raise UnsafePath("NUL in path")
        if recording_path.startswith("/"):
            prefix = next((p for p in self.prefixes if recording_path.startswith(p)), None)
            if prefix is None:
                raise UnsafePath("outside the recordings dir (an old spelling of it? see "
                                 "recordings.previous_dirs)")
            rest = recording_path[len(prefix):]
        else:
            rest = recording_path
        if "/" not in rest:  # the common case, <dir>/<call id>.wav
            if rest in ("", ".", ".."):
                raise UnsafePath("'..', '.' or an empty component")
            return (rest,)
        parts = tuple(rest.split("/"))
        if any(p in ("", ".", "..") for p in parts):
            raise UnsafePath("'..', '.' or an empty component")
        return parts

    @contextlib.contextmanager
    def parent(self, parts: Sequence[str]) -> Iterator[int]:
        """The fd of the file's directory, opening each level with O_NOFOLLOW."""
        self.need_root()
        if len(parts) == 1:
            yield self.fd  # the common case: <dir>/<call id>.wav
            return
        opened: list[int] = []
        try:
            fd = self.fd
            for part in parts[:-1]:
                try:
                    fd = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        raise UnsafePath("a directory on the way is a symlink") from exc
                    raise
                opened.append(fd)
            yield fd
        finally:
            for fd in opened:
                os.close(fd)

    def lstat(self, parts: Sequence[str]) -> os.stat_result:
        self.need_root()
        if len(parts) == 1:
            return os.lstat(parts[0], dir_fd=self.fd)  # fast path, no context manager
        with self.parent(parts) as dfd:
            return os.lstat(parts[-1], dir_fd=dfd)

    def unlink(self, parts: Sequence[str]) -> None:
        """Unlink a name the caller has ``lstat``-ed as a regular file.

        ``unlink`` never follows a symlink: if the name were swapped for a link
        since, the link itself would go, never its target.
        """
        self.need_root()
        if len(parts) == 1:
            os.unlink(parts[0], dir_fd=self.fd)
            return
        with self.parent(parts) as dfd:
            os.unlink(parts[-1], dir_fd=dfd)

    def open_regular(self, parts: Sequence[str]) -> int:
        """A read fd on a regular file, never through a symlink, never blocking.

        ``O_NONBLOCK`` comes first: opening a FIFO for reading would otherwise wait
        forever for a writer. It is cleared once the fd is known to be a file.
        """
        with self.parent(parts) as dfd:
            try:
                fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC
                             | os.O_NONBLOCK, dir_fd=dfd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise UnsafePath("a symlink") from exc
                raise
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise UnsafePath("not a regular file")
        os.set_blocking(fd, True)
        return fd

    def walk(self) -> Iterator[str]:
        """The relative path of every non-directory entry below the root.

        Entries are typed by ``d_type`` (no stat); subdirectories are entered
        fd-relative with ``O_NOFOLLOW``, so a symlinked directory is never entered.
        """
        if self.fd < 0:
            return
        stack: list[tuple[int, str]] = [(self.fd, "")]
        while stack:
            dfd, base = stack.pop()
            try:
                with os.scandir(dfd) as it:
                    entries = [(e.name, e.is_dir(follow_symlinks=False)) for e in it]
                for name, is_dir in entries:
                    if not is_dir:
                        yield base + name
                        continue
                    try:
                        sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                      | os.O_CLOEXEC, dir_fd=dfd)
                    except OSError:
                        continue  # replaced by a symlink or gone: not ours to enter
                    stack.append((sub, f"{base}{name}/"))
            finally:
                if dfd != self.fd:
                    os.close(dfd)
