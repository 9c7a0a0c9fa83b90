"""Small real filesystems for the disk-full and read-only tests: a tmpfs mounted by the test.

Mounting needs root (CI containers run as root here); elsewhere the tests skip with the reason."""

from __future__ import annotations

import os
import subprocess
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_tmpfs(where: Path, size: str):
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True
    )
    if proc.returncode:
        pytest.skip(f"cannot mount a small tmpfs for the disk-full test (needs root): {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], capture_output=True)


def remount(where: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(where)], check=True, capture_output=True)


def free_bytes(where: Path) -> int:
    st = os.statvfs(where)
    return st.f_bavail * st.f_frsize


def fill(where: Path, leave: int) -> Path:
    """A filler file leaving about ``leave`` bytes free on the filesystem of ``where``."""
    filler = where / "filler.bin"
    n = max(free_bytes(where) - leave, 0)
    with open(filler, "wb") as fh:
        block = b"\0" * (1 << 20)
        while n > 0:
            k = min(n, len(block))
            try:
                fh.write(block[:k])
                fh.flush()
            except OSError:
                break
            n -= k
    return filler


def temp_files(folder: Path) -> list[str]:
    """Temporary files of interrupted writes anywhere below ``folder``."""
    from cytopipe.files import is_temp_name

    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*") if is_temp_name(p.name))
