"""Files the project writes and reads back: one atomic writer, one checked JSON reader.

Every write goes to a unique temporary name in the target's folder (`tempfile.mkstemp`), is
flushed to disk (`fsync`) and renamed over the target (`os.replace`), so a reader sees the old
file or the new one, never half of one, and concurrent writers of the same file both succeed.
The temporary is removed on any failure. Files get the permissions the umask gives (as `open`
would), not mkstemp's 0600. A full disk or a folder that cannot be written becomes a
`UserError` naming the path; the previous file is left as it was.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bayesprompt.errors import UserError, first_line

NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
NOT_WRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS}


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_error(error: OSError, path: Path) -> UserError | OSError:
    """A UserError for a full disk or an unwritable folder while writing `path`; else `error`."""
    reason = first_line(error.strerror or error)
    if error.errno in NO_SPACE:
        return UserError(
            f"No space left on the disk while writing {path} ({reason}). Nothing was "
            "changed there: a file that was already present is intact. Free some space on "
            "that disk, or choose a folder on another disk, and run the command again; an "
            "interrupted training run continues with --resume."
        )
    if error.errno in NOT_WRITABLE:
        return UserError(
            f"Cannot write {path}: {reason} ({error.filename or path.parent}). Make "
            "the folder writable, or choose another one with the command's --out, "
            "--cache-dir or --root option (or $BAYESPROMPT_CACHE / $BAYESPROMPT_DATA)."
        )
    return error


def make_folder(folder: Path | str) -> Path:
    """`mkdir -p` with the umask's permissions; an unwritable parent becomes a UserError."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"Cannot make the folder {folder}: it, or a folder above it, is an "
                        "existing file. Choose another path (e.g. another --out).") from None
    except OSError as error:
        raise write_error(error, folder) from None
    return folder


def atomic_write(path: Path | str, write: Callable[[Path], None], required_bytes: int = 0
                 ) -> Path:
    """Call `write(temporary_path)`, then move the finished file to `path` atomically.

    `required_bytes` (an estimate of the file's size) is checked against the free space first,
    for writers that cannot be trusted to fail cleanly on a full disk (HDF5).
    """
    path = Path(path)
    make_folder(path.parent)
    try:
        if required_bytes and shutil.disk_usage(path.parent).free < required_bytes:
            raise OSError(errno.ENOSPC, f"{required_bytes} bytes needed, "
                          f"{shutil.disk_usage(path.parent).free} free", str(path.parent))
        handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise write_error(error, path) from None
    os.close(handle)
    temporary = Path(name)
    try:
        write(temporary)
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, path)
    except BaseException as error:
        temporary.unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise write_error(error, path) from None
        raise
    _fsync_folder(path.parent)
    return path


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable where the platform allows it (best effort)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass
    finally:
        os.close(handle)


def write_bytes(path: Path | str, data: bytes) -> Path:
    """Atomically write `data` to `path`."""
    return atomic_write(path, lambda temporary: temporary.write_bytes(data))


def write_text(path: Path | str, text: str) -> Path:
    """Atomically write `text` (UTF-8) to `path`."""
    return write_bytes(path, text.encode())


def write_json(path: Path | str, obj: Any, indent: int | None = 2) -> Path:
    """Atomically write `obj` as JSON (serialised before the disk is touched)."""
    return write_bytes(path, json.dumps(obj, indent=indent).encode())


def save_torch(path: Path | str, obj: Any) -> Path:
    """Atomically `torch.save` `obj`; serialised in memory so that disk errors are OSErrors."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return write_bytes(path, buffer.getvalue())


def read_json(path: Path | str, what: str, expected: type = dict) -> Any:
    """JSON from `path`, which must hold an `expected`; else a UserError that names the file.

    `what` says what the file is and what to do about a broken one, e.g. "the run's
    configuration; delete the run folder and train again".
    """
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{path} does not exist; it should hold {what}.") from None
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise UserError(f"Cannot read {path} ({error}): it should hold {what}.") from None
    if not isinstance(value, expected):
        raise UserError(
            f"{path} holds a JSON {type(value).__name__}, not a JSON "
            f"{'object' if expected is dict else expected.__name__}: it should hold {what}."
        )
    return value
