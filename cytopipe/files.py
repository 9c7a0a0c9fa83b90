"""Opening inputs and writing outputs safely: the lowest layer every reader and writer uses.

* :func:`open_regular` opens a file for reading only when it is a regular file. A FIFO would
  block ``open`` forever, ``/dev/zero`` (or a symlink to it) never ends a hashing loop, and a
  folder is not a file: all are refused with "not a regular file", without blocking.
* :func:`atomic_write` writes every output: a temporary file in the same folder (so the rename
  is atomic), flushed and fsynced, verified by the caller (size, rows read back), then renamed
  over the old file and the folder fsynced. Any failure removes the temporary file, keeps the
  old file and raises :class:`~cytopipe.errors.OutputWriteError` naming the file and the reason
  (disk full, read-only folder, no permission) and saying that rerunning resumes.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from cytopipe.errors import CytopipeError, NotRegularFileError, OutputWriteError

__all__ = [
    "TMP_SUFFIX",
    "atomic_write",
    "atomic_write_bytes",
    "describe_kind",
    "is_temp_name",
    "open_regular",
]

TMP_SUFFIX = ".tmp"


def _file_mode() -> int:
    """0o666 minus the umask: what a plain open() would give (mkstemp gives 0o600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_MODE = _file_mode()


# --- reading ------------------------------------------------------------------------------------
def describe_kind(mode: int) -> str:
    """'a FIFO (named pipe)', 'a character device', ... for a stat mode that is not a regular file."""
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def open_regular(
    path: str | Path, error: type[CytopipeError] = NotRegularFileError, what: str = "an FCS file"
) -> BinaryIO:
    """Open ``path`` for binary reading (unbuffered) when it is a regular file (symlinks followed).

    Opened non-blocking, then checked with ``fstat`` on the open descriptor (no race with a file
    swapped in between): a FIFO without a writer neither blocks nor is read. Raises ``error``
    ("not a regular file: a FIFO ...") or FileNotFoundError/PermissionError (OSError) as open does.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise error(
                f"not a regular file ({describe_kind(mode)}); give the path of {what}", file=Path(path)
            )
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


# --- writing ------------------------------------------------------------------------------------
def atomic_write(
    path: str | Path,
    write: Callable[[Path], None],
    verify: Callable[[Path], None] | None = None,
    mode: int | None = None,
) -> Path:
    """``write(tmp)`` writes the new content to ``tmp`` (a temporary file in ``path``'s folder);
    ``verify(tmp)`` raises when it is not complete. Only then does it replace ``path`` (with
    permissions ``mode``, default: what a plain open() gives under the umask)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
        os.close(fd)
    except OSError as exc:
        raise OutputWriteError.from_oserror(path, exc) from None
    tmp = Path(name)
    try:
        write(tmp)
        _fsync_file(tmp)
        if verify is not None:
            verify(tmp)
        os.chmod(tmp, _MODE if mode is None else mode)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        _remove_temp(tmp)
        raise OutputWriteError.from_oserror(path, exc) from None
    except BaseException:
        _remove_temp(tmp)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    def verify(tmp: Path) -> None:
        size = tmp.stat().st_size
        if size != len(data):
            raise OutputWriteError(
                f"the written file has {size} of {len(data)} bytes (disk full?)", file=Path(path)
            )

    return atomic_write(path, write, verify, mode)


def check_rows(tmp: Path, path: str | Path, rows: int, count: Callable[[Path], int]) -> None:
    """A written table ``tmp`` (to become ``path``) holds ``rows`` rows, as ``count(tmp)`` reads them
    back (a Parquet footer, an Arrow IPC file's batches); a file the reader cannot parse (truncated,
    damaged) or a short one raises :class:`OutputWriteError` naming ``path``."""
    try:
        n = count(tmp)
    except OSError:
        raise
    except Exception as exc:  # pyarrow: a truncated or damaged file
        raise OutputWriteError(f"the written table cannot be read back ({exc})", file=Path(path)) from None
    if n != rows:
        raise OutputWriteError(f"the written table has {n} of {rows} rows (disk full?)", file=Path(path))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make the rename durable (a crash right after it keeps the new file)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on folders; the rename itself has happened
    finally:
        os.close(fd)


def _remove_temp(tmp: Path) -> None:
    for extra in ("", ".wal"):
        _unlink_quietly(str(tmp) + extra)


def _unlink_quietly(path: str | Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def is_temp_name(name: str) -> bool:
    """A temporary file of an interrupted write: ``.NAME.xxxx.tmp`` (and DuckDB's ``.tmp.wal``)."""
    return name.startswith(".") and (name.endswith(TMP_SUFFIX) or name.endswith(TMP_SUFFIX + ".wal"))
