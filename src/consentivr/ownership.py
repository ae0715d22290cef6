"""The user model: who may touch which file, with a non-root Asterisk.

- Asterisk runs as ``asterisk`` (Debian's package does).
- consentivr, the service and the nightly purge alike, runs as its own user
  ``consentivr``, a member of group ``asterisk``. It cannot read Asterisk's config;
  Asterisk cannot read the consent log.

| path | owner:group | mode | why |
|---|---|---|---|
| /etc/consentivr | root:consentivr | 0750 | the config; no secrets in it |
| /etc/consentivr/*.password | consentivr:consentivr | 0600 | ARI/AMI passwords |
| /var/lib/consentivr | consentivr:asterisk | 2750 | Asterisk must reach prompts/ |
| /var/lib/consentivr/consent.db, .key | consentivr:consentivr | 0600 | the log, the caller key |
| /var/lib/consentivr/prompts | consentivr:asterisk | 2750 | Asterisk plays them |
| /var/spool/asterisk/consentivr | consentivr:asterisk | 2770 | MixMonitor writes, we delete |

The setgid bit gives new files and dirs the dir's group (``asterisk``), whoever
creates them, so a recording MixMonitor wrote can be deleted by consentivr (purge,
withdrawal) through the dir's group bits, and a prompt consentivr built is readable
by Asterisk. Nothing is open to others.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from consentivr.paths import make_private_dir

RECORDINGS_DIR_MODE = 0o2770


def prepare_recordings_dir(path: Path) -> None:
    """Create the recordings dir ``2770`` when missing; on an existing one keep the
    admin's group rules (MixMonitor writes through them) but take away others' access.

    ``service.prepare_paths`` calls this instead of forcing ``0700``, which locked a
    non-root Asterisk out of the dir.
    """
    if not path.exists():
        # Missing parents too, whatever the umask; refused under a world-writable dir.
        make_private_dir(path, RECORDINGS_DIR_MODE)
        return
    with contextlib.suppress(OSError):
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & stat.S_IRWXO:
            os.chmod(path, mode & ~stat.S_IRWXO)
