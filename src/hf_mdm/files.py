"""Writing without losing data: every file is written to a temporary name and renamed, every folder is built in a
hidden sibling and swapped into place, and one process at a time owns a destination.

- `write_atomically(path, text)`: a reader, or a kill, sees the old file or the new one, never half of one.
- `replace_folder(new, dst)`: `dst` becomes `new`; the two are exchanged in one atomic step where the system allows it
  (Linux renameat2 RENAME_EXCHANGE), else by two renames whose gap `recover_folder` repairs, so a kill never leaves
  `dst` absent for good.
- `FolderLock(dst)`: an exclusive lock beside `dst` (`.NAME.lock`, an OS lock: a killed holder releases it); a second
  process is refused at once, naming the holder.
- `staged_folder(dst, overwrite)`: all of the above for a writer of a whole folder (the converters).
"""

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path


def write_atomically(path: str | Path, data: str | bytes) -> None:
    """Writes `data` to a temporary file in `path`'s folder, flushes it to disk, and renames it over `path`."""
    path = Path(path)
    descriptor, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb" if isinstance(data, bytes) else "w", **({} if isinstance(data, bytes) else
                                                                                   {"encoding": "utf-8"})) as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(temp, 0o644)  # mkstemp makes it private; what we write is for everyone who can read the folder
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _exchange(first: Path, second: Path) -> bool:
    """Atomically swaps two existing paths (Linux renameat2 with RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    result = renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange)
    if result == 0:
        return True
    if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL, errno.EXDEV, errno.ENOTSUP):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(first))


def aside_name(dst: Path) -> Path:
    return dst.with_name(f".{dst.name}.old")


def replace_folder(new: Path, dst: Path) -> None:
    """Makes the finished folder `new` (a sibling of `dst`) the folder `dst`, replacing what was there."""
    new, dst = Path(new), Path(dst)
    if not dst.exists() and not dst.is_symlink():
        new.rename(dst)
        return
    if _exchange(new, dst):
        shutil.rmtree(new) if new.is_dir() and not new.is_symlink() else new.unlink()  # `new` now holds the old one
        return
    aside = aside_name(dst)
    shutil.rmtree(aside, ignore_errors=True)
    dst.rename(aside)  # a kill between these two renames leaves `aside`, which recover_folder() puts back
    new.rename(dst)
    shutil.rmtree(aside, ignore_errors=True)


def recover_folder(dst: Path) -> None:
    """After a kill between replace_folder's two renames: puts the old folder back where it was."""
    aside = aside_name(dst)
    if aside.exists() and not dst.exists():
        aside.rename(dst)
    elif aside.exists():
        shutil.rmtree(aside, ignore_errors=True)


class FolderLock:
    """An exclusive lock on `dst` for this process (a `.NAME.lock` file beside it, locked with flock: a process that
    dies releases it; removed on exit). Entering raises ValueError naming the holder if another process has it."""

    def __init__(self, dst: str | Path, what: str = "a process"):
        self.dst = Path(dst)
        self.path = self.dst.with_name(f".{self.dst.name}.lock")
        self.what = what
        self.handle = None

    def __enter__(self) -> "FolderLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            handle = open(self.path, "a+")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another process"
                handle.close()
                raise ValueError(f"{self.dst} is in use by {holder}: one {self.what} at a time writes there. Wait for "
                                 "it to finish, or choose another folder.") from None
            try:  # the holder before us may have removed the file between our open and our lock: lock the new one
                if os.stat(self.path).st_ino == os.fstat(handle.fileno()).st_ino:
                    break
            except FileNotFoundError:
                pass
            handle.close()
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        handle.flush()
        self.handle = handle
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.path.unlink(missing_ok=True)  # while still holding it: no one can take a lock on the old file
            fcntl.flock(self.handle, fcntl.LOCK_UN)
            self.handle.close()
            self.handle = None


class _Release:
    def __init__(self, lock: FolderLock):
        self.lock = lock

    def close(self) -> None:
        self.lock.__exit__(None, None, None)


def stale_staging(dst: Path) -> list[Path]:
    """Staging folders an earlier, killed writer of `dst` left behind (only call with dst's lock held)."""
    return sorted(dst.parent.glob(f".{dst.name}.partial-*")) if dst.parent.is_dir() else []


@contextlib.contextmanager
def staged_folder(dst: str | Path, overwrite: bool, what: str = "conversion", error=ValueError):
    """Yields a hidden, empty sibling folder of `dst` to write into; when the block ends without an exception it
    becomes `dst` (`replace_folder`), else it is removed. Holds `dst`'s lock throughout; first removes what killed
    earlier writers left (staging folders, an old folder set aside: put back). Raises `error` before anything is
    written if `dst` is a file, or a non-empty folder without `overwrite`."""
    dst = Path(dst)
    try:
        lock = FolderLock(dst, what).__enter__()
    except ValueError as busy:
        raise error(str(busy)) from None
    with contextlib.closing(_Release(lock)):
        recover_folder(dst)
        for stale in stale_staging(dst):
            shutil.rmtree(stale, ignore_errors=True)
        if dst.exists() and not dst.is_dir():
            raise error(f"{dst} is a file; the output is a folder.")
        if dst.is_dir() and any(dst.iterdir()) and not overwrite:
            raise error(f"{dst} exists and is not empty; pass overwrite=True (--overwrite) to replace it.")
        staging = Path(tempfile.mkdtemp(prefix=f".{dst.name}.partial-", dir=dst.parent))
        try:
            yield staging
            replace_folder(staging, dst)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise


__all__ = ["FolderLock", "recover_folder", "replace_folder", "staged_folder", "write_atomically"]
