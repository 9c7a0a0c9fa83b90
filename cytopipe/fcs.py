"""FCS reading and writing.

``read_fcs`` returns a :class:`Sample`: a float32 C-contiguous event matrix
(events x channels), the channel table, all TEXT keywords (upper-case keys, ``$`` kept),
the FCS version and the spillover matrix when the file has one.

This first version covers the common layouts (FCS 2.0/3.0/3.1, $DATATYPE I with one
word size, F and D, both byte orders). Every malformed input raises an
:class:`~cytopipe.errors.FCSError` subclass naming the file and the problem.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cytopipe.errors import (
    FCSDataError,
    FCSError,
    FCSHeaderError,
    FCSKeywordError,
    FCSUnsupportedError,
    SpilloverError,
)

CHANNEL_COLUMNS = ["n", "pnn", "pns", "pnr", "pnb", "pne", "png"]
SPILLOVER_KEYWORDS = ("$SPILLOVER", "SPILL", "$SPILL", "$COMP")


@dataclass
class Spillover:
    """A spillover matrix: ``matrix[i, j]`` is the fraction of fluorochrome ``i``'s
    signal seen in detector ``channels[j]`` (rows = sources, as FCS ``$SPILLOVER``)."""

    matrix: np.ndarray
    channels: list[str]
    keyword: str = "$SPILLOVER"

    def to_keyword_value(self) -> str:
        values = ",".join(_format_number(v) for v in np.asarray(self.matrix, dtype=np.float64).ravel())
        return f"{len(self.channels)},{','.join(self.channels)},{values}"


@dataclass
class Sample:
    """One FCS data set."""

    events: np.ndarray
    channels: pd.DataFrame
    keywords: dict[str, str]
    version: str
    spillover: Spillover | None = None
    path: Path | None = None
    dataset: int = 0
    preprocessed: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def n_events(self) -> int:
        return int(self.events.shape[0])

    @property
    def pnn(self) -> list[str]:
        return list(self.channels["pnn"])

    @property
    def markers(self) -> list[str]:
        return list(self.channels["pns"])

    def channel_index(self, name: str) -> int:
        """Column index of the channel whose ``$PnN`` is ``name``."""
        matches = np.flatnonzero(self.channels["pnn"].to_numpy() == name)
        if len(matches) != 1:
            raise FCSKeywordError(
                f"{'no' if len(matches) == 0 else 'more than one'} channel named {name!r}; "
                f"channels are {self.pnn}",
                file=self.path,
                channel=name,
            )
        return int(matches[0])

    def to_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame(self.events, columns=self.pnn)


# --------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------
def read_fcs(path: str | Path, dataset: int = 0, preprocess: bool = False) -> Sample:
    """Read one data set of an FCS file into a :class:`Sample`.

    ``preprocess=True`` applies the usual FCS preprocessing (gain ``$PnG`` on linear
    channels, log decoding of ``$PnE``, ``$TIMESTEP`` on the time channel) as FlowIO
    and FlowKit do.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise FCSError(f"cannot open: {exc.strerror}", file=path) from None
    with open(path, "rb") as fh:
        start = 0
        for index in range(dataset + 1):
            header = _read_header(fh, path, start, size)
            keywords, delimiter_warnings = _read_text(fh, path, header, start, size)
            if index < dataset:
                nxt = _int_keyword(keywords, "$NEXTDATA", path, default=0)
                if nxt <= 0:
                    raise FCSError(
                        f"data set {dataset} requested but the file has only {index + 1}", file=path
                    )
                start += nxt
        version = header["version"]
        channels = _channel_table(keywords, path)
        events = _read_data(fh, path, header, keywords, channels, start, size)
    spill = read_spillover(keywords, path)
    sample = Sample(
        events=events,
        channels=channels,
        keywords=keywords,
        version=version,
        spillover=spill,
        path=path,
        dataset=dataset,
        warnings=delimiter_warnings,
    )
    if preprocess:
        _preprocess(sample)
    return sample


def _read_header(fh, path: Path, start: int, size: int) -> dict:
    fh.seek(start)
    raw = fh.read(58)
    if len(raw) < 58:
        raise FCSHeaderError(f"file is {size} bytes, too short for an FCS HEADER (58 bytes)", file=path)
    magic = raw[:6].decode("ascii", "replace")
    if not re.fullmatch(r"FCS[0-9]\.[0-9]", magic):
        raise FCSHeaderError(
            f"not an FCS file: first bytes are {raw[:6]!r}, expected 'FCS3.1' or similar", file=path
        )
    offsets = []
    for i in range(6):
        field_bytes = raw[10 + 8 * i : 18 + 8 * i].decode("ascii", "replace").strip()
        if field_bytes == "":
            offsets.append(0)
            continue
        if not field_bytes.lstrip("-").isdigit():
            raise FCSHeaderError(
                f"HEADER offset field {i + 1} at byte {10 + 8 * i} is {field_bytes!r}, not a number",
                file=path,
            )
        offsets.append(int(field_bytes))
    return {
        "version": magic,
        "text": (offsets[0], offsets[1]),
        "data": (offsets[2], offsets[3]),
        "analysis": (offsets[4], offsets[5]),
    }


def _read_text(fh, path: Path, header: dict, start: int, size: int) -> tuple[dict[str, str], list[str]]:
    t0, t1 = header["text"]
    if t0 <= 0 or t1 <= t0 or start + t1 >= size:
        raise FCSHeaderError(
            f"HEADER gives TEXT segment {t0}-{t1} outside the file ({size} bytes)", file=path
        )
    fh.seek(start + t0)
    raw = fh.read(t1 - t0 + 1)
    return parse_text(raw, path), []


def parse_text(raw: bytes, path: Path | None = None) -> dict[str, str]:
    """Parse a TEXT segment into a dict with upper-case keys. Doubled delimiters are escapes."""
    if not raw:
        raise FCSKeywordError("TEXT segment is empty", file=path)
    delim = raw[:1]
    body = raw[1:]
    # split on single delimiters, treating doubled ones as literal characters
    placeholder = b"\x00\x01"
    tokens = body.replace(delim + delim, placeholder).split(delim)
    if tokens and tokens[-1] == b"":
        tokens = tokens[:-1]
    tokens = [t.replace(placeholder, delim) for t in tokens]
    if len(tokens) % 2:
        raise FCSKeywordError(
            f"TEXT segment has an odd number of fields ({len(tokens)}): a keyword lacks its value", file=path
        )
    keywords: dict[str, str] = {}
    for key, value in zip(tokens[0::2], tokens[1::2]):
        keywords[_decode(key).strip().upper()] = _decode(value)
    return keywords


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _int_keyword(keywords: Mapping[str, str], key: str, path: Path, default: int | None = None) -> int:
    value = keywords.get(key)
    if value is None or value.strip() == "":
        if default is not None:
            return default
        raise FCSKeywordError(f"required keyword {key} is missing", file=path, keyword=key)
    try:
        return int(value.strip())
    except ValueError:
        try:
            as_float = float(value.strip())
        except ValueError:
            raise FCSKeywordError(f"{key} is {value!r}, not an integer", file=path, keyword=key) from None
        if as_float != int(as_float):
            raise FCSKeywordError(f"{key} is {value!r}, not an integer", file=path, keyword=key) from None
        return int(as_float)


def _channel_table(keywords: Mapping[str, str], path: Path) -> pd.DataFrame:
    n_par = _int_keyword(keywords, "$PAR", path)
    if n_par <= 0:
        raise FCSKeywordError(
            f"$PAR is {n_par}; a file needs at least one parameter", file=path, keyword="$PAR"
        )
    rows = []
    for n in range(1, n_par + 1):
        pnn = keywords.get(f"$P{n}N", "").strip()
        pns = keywords.get(f"$P{n}S", "").strip()
        try:
            pnr = float(keywords.get(f"$P{n}R", "0").strip() or 0)
        except ValueError:
            raise FCSKeywordError(
                f"$P{n}R is {keywords[f'$P{n}R']!r}, not a number", file=path, keyword=f"$P{n}R"
            ) from None
        pnb_raw = keywords.get(f"$P{n}B", "").strip()
        if pnb_raw == "":
            raise FCSKeywordError(f"required keyword $P{n}B is missing", file=path, keyword=f"$P{n}B")
        try:
            pnb = int(pnb_raw) if pnb_raw != "*" else 0
        except ValueError:
            raise FCSKeywordError(
                f"$P{n}B is {pnb_raw!r}, not an integer", file=path, keyword=f"$P{n}B"
            ) from None
        pne = keywords.get(f"$P{n}E", "0,0").strip() or "0,0"
        try:
            png = float(keywords.get(f"$P{n}G", "1").strip() or 1)
        except ValueError:
            png = 1.0
        rows.append((n, pnn or f"P{n}", pns, pnr, pnb, pne, png))
    return pd.DataFrame(rows, columns=CHANNEL_COLUMNS)


_INT_DTYPES = {8: "u1", 16: "u2", 32: "u4", 64: "u8"}


def _read_data(
    fh, path: Path, header: dict, keywords, channels: pd.DataFrame, start: int, size: int
) -> np.ndarray:
    datatype = keywords.get("$DATATYPE", "").strip().upper()
    n_par = len(channels)
    n_tot = _int_keyword(keywords, "$TOT", path)
    d0, d1 = header["data"]
    if d0 == 0 and d1 == 0:
        d0 = _int_keyword(keywords, "$BEGINDATA", path)
        d1 = _int_keyword(keywords, "$ENDDATA", path)
    byteord = keywords.get("$BYTEORD", "1,2,3,4").replace(" ", "")
    order = ">" if byteord in ("4,3,2,1", "2,1") else "<"
    pnb = channels["pnb"].to_numpy()
    if datatype == "F":
        dtype = np.dtype(order + "f4")
    elif datatype == "D":
        dtype = np.dtype(order + "f8")
    elif datatype == "I":
        widths = set(pnb.tolist())
        if len(widths) != 1 or next(iter(widths)) not in _INT_DTYPES:
            raise FCSUnsupportedError(
                f"$DATATYPE I with $PnB {sorted(widths)} is not supported", file=path, keyword="$PnB"
            )
        dtype = np.dtype(order + _INT_DTYPES[next(iter(widths))])
    elif datatype == "A":
        raise FCSUnsupportedError("$DATATYPE A (ASCII) data is not supported", file=path, keyword="$DATATYPE")
    else:
        raise FCSKeywordError(
            f"$DATATYPE is {datatype!r}; expected I, F or D", file=path, keyword="$DATATYPE"
        )
    nbytes = n_tot * n_par * dtype.itemsize
    if start + d0 + nbytes > size:
        raise FCSDataError(
            f"DATA segment at byte {d0} needs {nbytes} bytes for $TOT={n_tot} x $PAR={n_par}, "
            f"but the file ends at byte {size}",
            file=path,
        )
    fh.seek(start + d0)
    data = np.fromfile(fh, dtype=dtype, count=n_tot * n_par).reshape(n_tot, n_par)
    if datatype == "I":
        pnr = channels["pnr"].to_numpy()
        masks = np.array(
            [
                (1 << max(int(math.ceil(math.log2(r))), 0)) - 1 if r > 1 else (1 << int(b)) - 1
                for r, b in zip(pnr, pnb)
            ],
            dtype=np.uint64,
        )
        data = data & masks.astype(data.dtype)
    return np.ascontiguousarray(data, dtype=np.float32)


def read_spillover(keywords: Mapping[str, str], path: Path | None = None) -> Spillover | None:
    """Parse the first spillover keyword present (``$SPILLOVER``, ``SPILL``, ``$SPILL``, ``$COMP``)."""
    for key in SPILLOVER_KEYWORDS:
        if key in keywords and keywords[key].strip():
            return parse_spillover(keywords[key], key, path)
    return None


def parse_spillover(value: str, keyword: str = "$SPILLOVER", path: Path | None = None) -> Spillover:
    parts = [p.strip() for p in value.split(",")]
    try:
        n = int(float(parts[0]))
    except ValueError:
        raise SpilloverError(
            f"first field is {parts[0]!r}, not the number of channels", file=path, keyword=keyword
        ) from None
    if n <= 0 or len(parts) != 1 + n + n * n:
        raise SpilloverError(
            f"declares {n} channels, so needs {1 + n + n * n} fields, but has {len(parts)}",
            file=path,
            keyword=keyword,
        )
    names = parts[1 : 1 + n]
    try:
        matrix = np.array([float(v) for v in parts[1 + n :]], dtype=np.float64).reshape(n, n)
    except ValueError:
        raise SpilloverError(
            "matrix holds a value that is not a number", file=path, keyword=keyword
        ) from None
    return Spillover(matrix=matrix, channels=names, keyword=keyword)


def _preprocess(sample: Sample) -> None:
    """Gain, log decoding and timestep, as FlowIO/FlowKit's preprocessing."""
    ev = sample.events.astype(np.float64)
    for i, row in sample.channels.iterrows():
        f1, f2 = _parse_pne(row["pne"])
        if f1 > 0:
            if f2 == 0:
                f2 = 1.0
            ev[:, i] = f2 * 10 ** (f1 * ev[:, i] / row["pnr"])
        elif row["png"] not in (0, 1):
            ev[:, i] = ev[:, i] / row["png"]
    timestep = sample.keywords.get("$TIMESTEP")
    if timestep:
        time_idx = [i for i, n in enumerate(sample.pnn) if n.lower() == "time"]
        for i in time_idx:
            ev[:, i] *= float(timestep)
    sample.events = np.ascontiguousarray(ev, dtype=np.float32)
    sample.preprocessed = True


def _parse_pne(value: str) -> tuple[float, float]:
    try:
        a, b = (float(x) for x in value.split(","))
        return a, b
    except ValueError:
        return 0.0, 0.0


# --------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------
def write_fcs(
    path: str | Path,
    events: np.ndarray,
    channels: pd.DataFrame | Sequence[str] | Sequence[tuple[str, str]],
    keywords: Mapping[str, str] | None = None,
    spillover: Spillover | None = None,
) -> Path:
    """Write an FCS 3.1 file with float32 little-endian data.

    ``channels`` is a channel table (columns ``pnn``, optional ``pns``, ``pnr``), a list
    of ``$PnN`` names or a list of ``(pnn, pns)`` pairs. ``keywords`` are extra TEXT
    keywords (a ``$SPILLOVER`` string is allowed); ``spillover`` writes ``$SPILLOVER``.
    """
    path = Path(path)
    data = np.ascontiguousarray(events, dtype="<f4")
    if data.ndim != 2:
        raise FCSDataError(
            f"events must be a 2-D array (events x channels), got shape {data.shape}", file=path
        )
    table = _as_channel_table(channels, data)
    if len(table) != data.shape[1]:
        raise FCSDataError(f"{len(table)} channels named but events have {data.shape[1]} columns", file=path)
    text: dict[str, str] = {}
    reserved = {
        "$BEGINDATA",
        "$ENDDATA",
        "$BEGINSTEXT",
        "$ENDSTEXT",
        "$BEGINANALYSIS",
        "$ENDANALYSIS",
        "$BYTEORD",
        "$DATATYPE",
        "$MODE",
        "$NEXTDATA",
        "$PAR",
        "$TOT",
    }
    text.update(
        {
            "$BYTEORD": "1,2,3,4",
            "$DATATYPE": "F",
            "$MODE": "L",
            "$NEXTDATA": "0",
            "$PAR": str(data.shape[1]),
            "$TOT": str(data.shape[0]),
        }
    )
    for i, row in table.iterrows():
        n = i + 1
        text[f"$P{n}N"] = str(row["pnn"])
        text[f"$P{n}B"] = "32"
        text[f"$P{n}E"] = "0,0"
        text[f"$P{n}R"] = _format_number(row["pnr"])
        if str(row.get("pns", "") or "").strip():
            text[f"$P{n}S"] = str(row["pns"])
    for key, value in (keywords or {}).items():
        key = key.upper()
        if key in reserved or re.fullmatch(r"\$P\d+[NBERS]", key):
            continue
        value = str(value)
        if value.strip():
            text[key] = value
    if spillover is not None:
        text["$SPILLOVER"] = spillover.to_keyword_value()
    data_bytes = data.tobytes()
    header, text_bytes = _layout(text, len(data_bytes))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(header)
        fh.write(text_bytes)
        fh.write(data_bytes)
    tmp.replace(path)
    return path


def _as_channel_table(channels, data: np.ndarray) -> pd.DataFrame:
    if isinstance(channels, pd.DataFrame):
        table = channels.reset_index(drop=True).copy()
    else:
        rows = [(c, "") if isinstance(c, str) else (c[0], c[1]) for c in channels]
        table = pd.DataFrame(rows, columns=["pnn", "pns"])
    if "pns" not in table:
        table["pns"] = ""
    if "pnr" not in table or table["pnr"].isna().any():
        top = np.nanmax(data, axis=0) if data.shape[0] else np.zeros(data.shape[1])
        table["pnr"] = [max(262144.0, float(2 ** math.ceil(math.log2(max(v, 1.0))))) for v in top]
    table["pns"] = table["pns"].fillna("")
    return table


def _layout(text: dict[str, str], n_data: int) -> tuple[bytes, bytes]:
    """Place HEADER, TEXT and DATA; offsets change TEXT length, so iterate to a fixed point."""
    delim = "|"
    text_start = 58
    begin_data = end_data = 0
    for _ in range(10):
        full = dict(text)
        full.update(
            {
                "$BEGINANALYSIS": "0",
                "$ENDANALYSIS": "0",
                "$BEGINSTEXT": "0",
                "$ENDSTEXT": "0",
                "$BEGINDATA": str(begin_data),
                "$ENDDATA": str(end_data),
            }
        )
        body = delim + "".join(
            f"{k.replace(delim, delim * 2)}{delim}{v.replace(delim, delim * 2)}{delim}"
            for k, v in full.items()
        )
        text_bytes = body.encode("utf-8")
        text_end = text_start + len(text_bytes) - 1
        new_begin = text_end + 1
        new_end = new_begin + n_data - 1 if n_data else new_begin
        if (new_begin, new_end) == (begin_data, end_data):
            break
        begin_data, end_data = new_begin, new_end
    fits = end_data <= 99_999_999
    h_data = (begin_data, end_data) if fits else (0, 0)
    header = "FCS3.1    " + "".join(f"{v:>8d}" for v in (text_start, text_end, *h_data, 0, 0))
    return header.encode("ascii"), text_bytes


def _format_number(value: float) -> str:
    value = float(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(value)
