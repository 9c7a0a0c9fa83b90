"""Whether a file shows an arm name: the check of the files blinding does not rewrite (a user's).

Blinding fails closed: a file cytopipe did not write stays in a blinded run folder only when it was
checked and shows no arm name. What can be checked, whatever the file's name or extension:

* a Parquet table (its column names and text cells);
* a file whose bytes are text (UTF-8, UTF-16 with its byte-order mark, or a single-byte encoding
  such as Windows-1252: no NUL and no control character but tab, line and page breaks);
* a zip file (``.xlsx``, ``.docx``, ``.odt``, ``.ods``, ``.zip``, ...): every member's name and
  every member, each by these same rules (an office file's XML parts are also read without their
  tags, so that a name split over two runs of a Word paragraph is found);
* an FCS file (its TEXT segment is plain ASCII; the data segment is numbers);
* an HDF5 file (``.h5ad``, ``.h5``): the names, attributes and text datasets of every group;
* a macOS ``.DS_Store`` (told by its ``Bud1`` header; Finder writes one into every folder it opens,
  network shares too): it holds the folder's entry names (UTF-16BE) and view settings (binary
  property lists: ASCII, UTF-8 or UTF-16BE strings), so its bytes are read as UTF-16 (big- and
  little-endian, at both byte alignments), UTF-8 and Latin-1, and every arm name is searched in each.

Anything else (a PDF, whose text is compressed; an image, whose pixels can show an arm; any other
binary file) cannot be checked: :class:`CannotCheck`, and the command refuses before any work. So
are two other files operating systems write by themselves, each with a message that says what it
is: an AppleDouble ``._NAME`` (macOS, on a volume that is not a Mac's: the resource fork and
extended attributes of ``NAME``, which can hold a custom icon or any other picture) and a Windows
``Thumbs.db`` (a thumbnail cache: small pictures of the folder's images, which can show an arm).
Windows' ``desktop.ini`` is text (checked as text).
"""

from __future__ import annotations

import html
import io
import re
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path

import pandas as pd

from cytopipe.errors import ReportError

Leaks = Callable[[Mapping[str, str]], list[str]]

#: control bytes that a text file does not hold (tab, line feed, page feed and return aside)
_CONTROL = re.compile(rb"[\x00-\x08\x0b\x0e-\x1a\x1c-\x1f]")
_HDF5 = b"\x89HDF\r\n\x1a\n"
_DS_STORE = b"\x00\x00\x00\x01Bud1"  # a macOS Finder .DS_Store (a "buddy allocator" file)
_APPLEDOUBLE = b"\x00\x05\x16\x07"
_OLE = b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1"  # a compound file: old Office, Windows' Thumbs.db
_TAGS = re.compile(r"<[^>]*>")
_NESTING = 3  # zip files inside zip files, at most
_WHOLE = 64 << 20  # a larger file (not a table, zip or HDF5 file) is read in chunks of this size
_OVERLAP = 4096  # characters of a chunk's end checked again with the next chunk


class CannotCheck(ReportError):
    """The file's content cannot be checked for arm names; ``str(exc)`` says what it is (the
    callers name the file and refuse the command)."""


def shown_arm(path: Path, leaks: Leaks) -> str:
    """Where ``path`` shows an arm name, the first place: ``"line N: 'arm'"``, a Parquet file's
    ``"column 'c': 'arm'"``, a zip member's ``"xl/sharedStrings.xml, line N: 'arm'"``; ``""``:
    nowhere. Raises :class:`CannotCheck` for a file whose content cannot be checked (see the
    module's docstring)."""
    path = Path(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head[:4] == b"PAR1":
        return _parquet_arm(path, leaks)
    if head == _HDF5:
        return _hdf5_arm(path, leaks)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return _zip_arm(path, leaks, depth=0)
    _refuse_system_file(path, head)
    if path.stat().st_size > _WHOLE:
        return _large_arm(path, head, leaks)
    return _bytes_arm(path.read_bytes(), path.name, leaks, depth=0)


def _large_arm(path: Path, head: bytes, leaks: Leaks) -> str:
    """A text or FCS file too large to read whole (a copy of raw data): read in chunks, each with
    the end of the one before (longer than any arm name); where: ``"the file"``."""
    fcs = head[:3] == b"FCS"
    tail = ""
    with open(path, "rb") as fh:
        while chunk := fh.read(_WHOLE):
            if not fcs and (_CONTROL.search(chunk) or chunk.startswith((b"\xff\xfe", b"\xfe\xff"))):
                raise CannotCheck("not text, nor a kind of file cytopipe can read for arm names")
            text = tail + chunk.decode("latin-1" if fcs else "utf-8", errors="replace")
            if shown := leaks({"the file": text}):
                return shown[0]
            tail = text[-_OVERLAP:]
    return ""


def _refuse_system_file(path: Path, head: bytes) -> None:
    """:class:`CannotCheck`, saying what it is, for a file an operating system writes by itself
    that can hold pictures: an AppleDouble ``._NAME`` (macOS) or a Windows ``Thumbs.db``."""
    if head[:4] == _APPLEDOUBLE:
        raise CannotCheck(
            "an AppleDouble file macOS writes beside a file on a volume that is not a Mac's: the "
            "resource fork and extended attributes of that file, which can hold a picture such as a "
            "custom icon; delete it (on a Mac: dot_clean FOLDER)"
        )
    if head == _OLE and path.name.lower() in ("thumbs.db", "ehthumbs.db", "ehthumbs_vista.db"):
        raise CannotCheck(
            "a Windows thumbnail cache, which holds small pictures of the folder's images; delete it "
            "(Windows writes it again only where thumbnails are cached on network folders)"
        )


def _ds_store_arm(data: bytes, leaks: Leaks) -> str:
    """Where a macOS ``.DS_Store`` shows an arm name (``"the file (UTF-16BE): 'arm'"``): its
    strings are entry names in UTF-16BE and the text of binary property lists (ASCII, UTF-8,
    UTF-16BE), at any byte alignment."""
    readings = {
        "UTF-16BE": data.decode("utf-16-be", "replace") + "\n" + data[1:].decode("utf-16-be", "replace"),
        "UTF-16LE": data.decode("utf-16-le", "replace") + "\n" + data[1:].decode("utf-16-le", "replace"),
        "UTF-8": data.decode("utf-8", "replace"),
        "Latin-1": data.decode("latin-1"),
    }
    for codec, text in readings.items():
        if shown := leaks({f"the file ({codec})": text}):
            return shown[0]
    return ""


def _bytes_arm(data: bytes, name: str, leaks: Leaks, depth: int) -> str:
    if not data:
        return ""
    if data.startswith(_DS_STORE):
        return _ds_store_arm(data, leaks)
    if data[:4] == b"PK\x03\x04" or data[:4] == b"PK\x05\x06":
        return _zip_arm(io.BytesIO(data), leaks, depth)
    if data[:3] == b"FCS" and data[3:6].replace(b".", b"").isdigit():
        return _text_arm(data.decode("latin-1"), leaks, lines=False)
    if data[:4] == b"PAR1":
        return _parquet_arm(io.BytesIO(data), leaks)
    text = _as_text(data)
    if text is None:
        raise CannotCheck("not text, nor a kind of file cytopipe can read for arm names")
    shown = _text_arm(text, leaks)
    if not shown and name.lower().endswith((".xml", ".rels", ".html", ".htm", ".svg")):
        stripped = html.unescape(_TAGS.sub("", text))  # a name split over two tags (Word runs)
        shown = _text_arm(stripped, leaks, lines=False).replace("the file", "its text without tags", 1)
    return shown


def _as_text(data: bytes) -> str | None:
    """``data`` as text, or ``None`` when it is not text."""
    for bom, codec in ((b"\xff\xfe", "utf-16"), (b"\xfe\xff", "utf-16")):
        if data.startswith(bom):
            try:
                return data.decode(codec)
            except UnicodeDecodeError:
                return None
    if _CONTROL.search(data):
        return None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")  # a single-byte encoding: every arm name in ASCII is found


def _zip_arm(source: Path | io.BytesIO, leaks: Leaks, depth: int) -> str:
    if depth >= _NESTING:
        raise CannotCheck(f"a zip file nested {depth} deep in zip files")
    try:
        with zipfile.ZipFile(source) as archive:
            members = [m for m in archive.infolist() if not m.is_dir()]
            if shown := leaks({"its member names": "\n".join(m.filename for m in members)}):
                return shown[0]
            for member in members:
                try:
                    shown = _bytes_arm(archive.read(member), member.filename, leaks, depth + 1)
                except CannotCheck as exc:
                    raise CannotCheck(f"a zip file whose member {member.filename} is {exc}") from None
                if shown:
                    return f"{member.filename}, {shown}"
    except (zipfile.BadZipFile, OSError, RuntimeError, ValueError, NotImplementedError) as exc:
        raise CannotCheck(f"a zip file that cannot be read ({exc})") from None  # e.g. encrypted
    return ""


def _parquet_arm(source: Path | io.BytesIO, leaks: Leaks) -> str:
    try:
        df = pd.read_parquet(source)
    except Exception as exc:  # noqa: BLE001 - any reader error: not checked, refused
        raise CannotCheck(f"a Parquet file that cannot be read ({type(exc).__name__})") from None
    for column in df.columns:
        col = df[column]
        texty = col.dtype.kind in "OUS" or isinstance(col.dtype, (pd.StringDtype, pd.CategoricalDtype))
        values = [str(column), *col.dropna().astype(str).unique()] if texty else [str(column)]
        if shown := leaks({f"column {str(column)!r}": "\n".join(values)}):
            return shown[0]
    return ""


def _hdf5_arm(path: Path, leaks: Leaks) -> str:
    import h5py
    import numpy as np

    found: list[str] = []

    def texts_of(name: str, obj: object) -> None:
        parts = [name, *map(str, obj.attrs.keys())]
        for value in obj.attrs.values():
            arr = np.asarray(value)
            if arr.dtype.kind in "OSU":
                parts += [
                    v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in arr.ravel()
                ]
        if isinstance(obj, h5py.Dataset) and (obj.dtype.kind in "OSU" or h5py.check_string_dtype(obj.dtype)):
            parts += [
                v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in np.ravel(obj[()])
            ]
        if isinstance(obj, h5py.Dataset) and obj.dtype.names:  # a table of records: every field shown
            parts += [str(v) for v in np.ravel(obj[()])]
        if isinstance(obj, h5py.Dataset) and (enum := h5py.check_enum_dtype(obj.dtype)):
            parts += list(enum)  # the names of an enumeration
        if not found and (shown := leaks({name: "\n".join(parts)})):
            found.append(shown[0])

    try:
        with h5py.File(path, "r") as f:
            texts_of("/", f)
            f.visititems(texts_of)
    except Exception as exc:  # noqa: BLE001 - any reader error: not checked, refused
        raise CannotCheck(f"an HDF5 file that cannot be read ({type(exc).__name__})") from None
    return found[0] if found else ""


def _text_arm(text: str, leaks: Leaks, lines: bool = True) -> str:
    if not leaks({"file": text}):
        return ""
    for number, line in enumerate(text.splitlines() if lines else (), start=1):
        if shown := leaks({f"line {number}": line}):
            return shown[0]
    return leaks({"the file": text})[0]  # not within one line (an arm name with a line break)
