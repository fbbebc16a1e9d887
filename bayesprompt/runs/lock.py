"""One process at a time in a run folder: an advisory lock (`fcntl.flock`) on RUN/.lock.

The process that trains, resumes or otherwise writes a run folder holds the lock until it is
done; under torchrun rank 0 holds it. A second process is refused with a UserError naming the
folder and the holder's PID (written into the lock file, for that message only). The kernel
drops the lock when its holder exits, however it exits, so a killed run never blocks a later
`--resume`. While it holds the lock, the holder removes temporaries that a killed writer left
(`bayesprompt.files.atomic_write` names them `.NAME.XXXXXXXX.tmp`): no other process can be
writing them.
"""

from __future__ import annotations

import fcntl
import os
import re
from pathlib import Path
from types import TracebackType
from typing import IO

from bayesprompt.errors import UserError
from bayesprompt.files import make_folder, write_error

#: The lock file in a run folder.
LOCK_FILE = ".lock"
#: The temporaries of `bayesprompt.files.atomic_write` (tempfile.mkstemp: 8 random characters).
TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")


class RunFolderLock:
    """Holds at most one run folder's lock; `with RunFolderLock() as lock: lock.hold(folder)`
    releases it at the end of the block (and the kernel at the end of the process)."""

    def __init__(self) -> None:
        self._file: IO[str] | None = None

    def hold(self, folder: Path) -> None:
        """Create `folder` if needed and lock it, or raise a UserError naming the process
        that holds it; then remove stale temporaries from it."""
        make_folder(folder)
        path = folder / LOCK_FILE
        try:
            file = open(path, "a+")  # noqa: SIM115 (held open: the lock lives with the file)
        except OSError as error:
            raise write_error(error, path) from None
        try:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "unknown"
            file.close()
            raise UserError(
                f"{folder} is in use by another process (PID {holder}), which is training or "
                "writing that run. Wait for it to finish (or stop it), or pass another --out."
            ) from None
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()}\n")
        file.flush()
        self._file = file
        remove_stale_temporaries(folder)

    def release(self) -> None:
        """Unlock (closing the lock file drops the lock)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> RunFolderLock:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.release()


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Remove the atomic writer's temporaries left in `folder` by a killed process (call it
    with the folder's lock held); returns what was removed."""
    stale = [path for path in folder.iterdir() if TEMPORARY.match(path.name) and path.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
