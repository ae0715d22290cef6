"""Private directories and trusted files, whatever the umask.

Under ``umask 000`` ``mkdir -p`` makes world-writable dirs, and then another
local user can swap the caller key or the log. So:

* :func:`make_private_dir` creates every missing level with an explicit mode
  (0700, or 0750 where Asterisk's group must read), chmod-ed after ``mkdir`` so
  the umask cannot widen it;
* :func:`check_parents` refuses a file whose directory (or any directory above,
  unless it is sticky like ``/tmp``) is world-writable;
* :func:`check_owner` refuses a key or log owned by another user.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from consentivr.errors import StoreError


def show(path: object) -> str:
    """A path as one printable line (JSON-quoted if it has odd characters)."""
    from consentivr.text import one_line

    return one_line(str(path))


def make_private_dir(path: Path, mode: int = 0o700) -> None:
    """Create ``path`` and its missing parents with ``mode``; existing ones are kept.

    Raises StoreError when a directory on the way is world-writable (not sticky).
    """
    path = Path(path)
    missing: list[Path] = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists():
        check_parents(probe / "x")  # the deepest existing dir must be safe to create in
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            continue  # made meanwhile (another process): checked below
        except OSError as exc:
            raise StoreError(f"{show(d)}: cannot create the directory: {exc.strerror}") \
                from exc
        os.chmod(d, mode)  # mkdir's mode is masked by the umask; chmod's is not
    if not path.is_dir():
        raise StoreError(f"{show(path)}: not a directory")


def _world_writable(st: os.stat_result) -> bool:
    return bool(st.st_mode & stat.S_IWOTH)


def check_parents(path: Path) -> None:
    """Refuse a file in a directory others may write (they could swap it).

    The file's own directory must not be world-writable at all (a sticky bit
    keeps others from replacing our files, so a sticky dir is allowed);
    directories above must not be world-writable unless sticky.
    """
    parent = Path(os.path.abspath(path)).parent
    for d in (parent, *parent.parents):
        try:
            st = d.stat()
        except OSError:
            continue  # not there yet: it will be made private
        if _world_writable(st) and not st.st_mode & stat.S_ISVTX:
            raise StoreError(
                f"{show(d)} is world-writable: another user could replace "
                f"{show(path)}; chmod o-w {show(d)} (or move the file)")


def check_not_writable_by_others(path: Path, what: str) -> None:
    """Refuse a file that group or others may write (they could rewrite it)."""
    try:
        st = os.lstat(path)
    except OSError:
        return
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise StoreError(f"{show(path)}: the {what} is writable by group or others: "
                         f"chmod 600 it")


def check_owner(path: Path, what: str) -> None:
    """Refuse a file owned by someone other than us (or root, or the dir's owner).

    Root running the CLI on the service's files is fine: a file owned by the
    owner of its directory cannot have been swapped in by a third user.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StoreError(f"{show(path)}: cannot check the {what}: {exc.strerror}") from exc
    euid = os.geteuid()
    if st.st_uid in (euid, 0):
        return
    if euid == 0:
        try:
            if os.stat(Path(path).parent).st_uid == st.st_uid:
                return
        except OSError:
            pass
    raise StoreError(f"{show(path)}: the {what} is owned by uid {st.st_uid}, not by this "
                     f"user (uid {euid}) or root: refusing to use it")
