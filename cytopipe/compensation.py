"""Spillover compensation: apply a matrix, read one, or compute one from single-stain controls.

A :class:`Compensation` holds a *spillover* matrix ``S`` in the FCS ``$SPILLOVER`` convention:
``S[i, j]`` is the fraction of fluorochrome ``i``'s signal (measured in its own detector
``channels[i]``) that lands in detector ``channels[j]``; rows are sources, the diagonal is 1.
Observed = true @ S, so compensated = observed @ inv(S). ``inv(S)`` is computed once; applying
it is one float32 matrix product over the matrix's columns, in row blocks that stay in cache.

:func:`compute_spillover` estimates ``S`` from single-stain controls (the AutoSpill idea, Roca et
al. 2021): for each control, find the positive population in its primary detector, fit robust
slopes of every detector against the primary one through the matched negative population, then
compensate the controls with the estimate and refit the residual slopes until they vanish.

Why one module: applying a matrix, reading one from a file and computing one from controls share
the :class:`Compensation` type, its validation and its channel matching; the AutoSpill estimate
(over 400 of the lines) is one iterative algorithm whose private helpers nothing else calls.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from cytopipe.errors import CompensationError, CytopipeError

MAX_CONDITION = 1e6
SCATTER_Z = 3.0
DIM_SEPARATION = 15.0  # positive median this many negative robust SDs above the negatives  # beyond this float32 compensation loses most significant digits
_ROW_BLOCK = 32768
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_NON_FLUORESCENCE = re.compile(r"^(FSC|SSC|TIME|EVENT|WIDTH|HDR|SAMPLEID|ORIGINAL_ID)", re.IGNORECASE)


# ============================================================================================
# the model
# ============================================================================================
@dataclass(frozen=True, eq=False)
class Compensation:
    """A spillover matrix (rows = sources, FCS ``$SPILLOVER`` convention) over ``$PnN`` channels.

    ``source`` says where it came from (``"file:SPILL"``, ``"csv:path"``, ``"computed"``,
    ``"identity"``) and is recorded with runs.
    """

    matrix: np.ndarray
    channels: tuple[str, ...]
    source: str = "user"
    _inverse: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        channels = tuple(str(c).strip() for c in self.channels)
        try:
            matrix = np.array(self.matrix, dtype=np.float64, copy=True)
        except (TypeError, ValueError):
            raise CompensationError(
                f"spillover matrix ({self.source}) holds a value that is not a number"
            ) from None
        where = f"spillover matrix ({self.source})"
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise CompensationError(f"{where} must be square, got shape {matrix.shape}")
        if matrix.shape[0] == 0:
            raise CompensationError(f"{where} is empty")
        if len(channels) != matrix.shape[0]:
            raise CompensationError(
                f"{where} is {matrix.shape[0]} x {matrix.shape[0]} but names {len(channels)} channels: {list(channels)}"
            )
        if any(not c for c in channels):
            raise CompensationError(f"{where} has an empty channel name: {list(channels)}")
        dupes = sorted({c for c in channels if channels.count(c) > 1})
        if dupes:
            raise CompensationError(f"{where} names channels more than once: {dupes}", channel=dupes[0])
        bad = np.argwhere(~np.isfinite(matrix))
        if bad.size:
            i, j = bad[0]
            raise CompensationError(
                f"{where} has a missing or non-finite value ({matrix[i, j]}) at row {channels[i]!r}, "
                f"column {channels[j]!r}; fill it in (0 for no spillover)",
                channel=channels[j],
            )
        cond = np.linalg.cond(matrix)
        if not np.isfinite(cond) or cond > MAX_CONDITION:
            raise CompensationError(
                f"{where} is singular or ill-conditioned (condition number {cond:.3g} > {MAX_CONDITION:g}): "
                "two rows are (nearly) the same or a diagonal entry is 0; check the matrix"
            )
        matrix.setflags(write=False)
        inverse = np.linalg.inv(matrix)
        inverse.setflags(write=False)
        object.__setattr__(self, "matrix", matrix)
        object.__setattr__(self, "channels", channels)
        object.__setattr__(self, "_inverse", inverse)

    # --- constructors -------------------------------------------------------------------
    @classmethod
    def identity(cls, channels: Sequence[str]) -> Compensation:
        """No compensation over ``channels`` (useful to record "none" explicitly)."""
        return cls(np.eye(len(channels)), tuple(channels), "identity")

    @classmethod
    def from_spillover(cls, spill: Any, source: str | None = None) -> Compensation:
        """From a :class:`cytopipe.fcs.Spillover` (a file's ``$SPILLOVER``/``SPILL`` keyword)."""
        source = source or getattr(spill, "source", None)  # a CSV or computed matrix set on the sample
        return cls(
            spill.matrix, tuple(spill.channels), source or f"file:{getattr(spill, 'keyword', 'SPILL')}"
        )

    @classmethod
    def from_sample(cls, sample: Any) -> Compensation:
        """The spillover matrix stored in a Sample's keywords."""
        if getattr(sample, "spillover", None) is None:
            raise CompensationError(
                "the file has no spillover keyword ($SPILLOVER, SPILL, $COMP); give a matrix CSV, "
                "compute one from single-stain controls, or use compensation 'none'",
                file=getattr(sample, "path", None),
            )
        try:
            return cls.from_spillover(sample.spillover)
        except CompensationError as exc:
            raise CompensationError(exc.message, file=getattr(sample, "path", None), **exc.context) from None

    @classmethod
    def from_dataframe(cls, df: pd.DataFrame, source: str = "dataframe") -> Compensation:
        """Index = sources, columns = detectors (same names); rows are put in column order."""
        cols = [str(c).strip() for c in df.columns]
        rows = [str(r).strip() for r in df.index]
        if sorted(rows) != sorted(cols):
            raise CompensationError(
                f"row labels {rows} and column labels {cols} name different channels; "
                "a spillover matrix lists the same channels in both"
            )
        frame = df.copy()
        frame.columns, frame.index = cols, rows
        return cls(frame.loc[cols, cols].to_numpy(dtype=np.float64), tuple(cols), source)

    @classmethod
    def from_csv(
        cls, path: str | Path, channels: Sequence[str] | None = None, *, percent: bool | None = None
    ) -> Compensation:
        """Read a matrix CSV/TSV as FlowJo, FlowKit, flowCore or CytoExploreR write it.

        Accepted: a header row of ``$PnN`` names (optionally after ``#``, e.g. FlowJo/FlowKit
        ``# FITC-A,PE-A``), optionally a leading label column (CytoExploreR/flowCore
        ``"",FITC-A,...`` with row names), comment lines before the header, comma, tab or
        semicolon delimiters, or the one-line FCS form ``n,ch1,...,chn,v11,...``. Without a
        header, ``channels`` must give the names. ``percent``: values are percentages (diagonal
        100); ``None`` detects it from the diagonal.
        """
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8-sig")
        except OSError as exc:
            raise CompensationError(f"cannot read the matrix file: {exc.strerror}", file=path) from None
        except UnicodeDecodeError:
            text = path.read_bytes().decode("latin-1")
        try:
            return cls.from_text(text, channels, percent=percent, source=f"csv:{path}")
        except CompensationError as exc:
            raise CompensationError(exc.message, file=path, **exc.context) from None

    @classmethod
    def from_text(
        cls,
        text: str,
        channels: Sequence[str] | None = None,
        *,
        percent: bool | None = None,
        source: str = "text",
    ) -> Compensation:
        """Parse matrix text (see :meth:`from_csv`)."""
        names, matrix = _parse_matrix_text(text, channels)
        diag = np.diag(matrix)
        if percent is None:
            percent = bool(np.allclose(diag, 100.0)) and not np.allclose(diag, 1.0)
        if percent:
            matrix = matrix / 100.0
        return cls(matrix, tuple(names), source)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Compensation:
        """Inverse of :meth:`to_dict`."""
        try:
            comp = cls(
                np.asarray(data["matrix"], dtype=np.float64),
                tuple(data["channels"]),
                data.get("source", "dict"),
            )
        except KeyError as exc:
            raise CompensationError(
                f"a compensation record needs 'matrix' and 'channels'; {exc} is missing"
            ) from None
        if data.get("hash") and data["hash"] != comp.hash:
            raise CompensationError(
                "compensation record hash does not match its matrix (edited?)", key="hash"
            )
        return comp

    # --- views and records -----------------------------------------------------------------
    @property
    def inverse(self) -> np.ndarray:
        """inv(S), float64 (read-only)."""
        return self._inverse

    @property
    def is_identity(self) -> bool:
        return bool(np.array_equal(self.matrix, np.eye(len(self.channels))))

    @property
    def hash(self) -> str:
        """Stable sha256 (hex) of channels and matrix values."""
        payload = {
            "channels": list(self.channels),
            "matrix": [[float(v) for v in row] for row in self.matrix],
        }
        return hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "channels": list(self.channels),
            "matrix": [[float(v) for v in row] for row in self.matrix],
            "source": self.source,
            "hash": self.hash,
        }

    def to_dataframe(self) -> pd.DataFrame:
        return pd.DataFrame(np.array(self.matrix), index=list(self.channels), columns=list(self.channels))

    def to_csv(self, path: str | Path) -> Path:
        """Write with a header row and a leading label column (readable by :meth:`from_csv`,
        flowCore and CytoExploreR)."""
        from cytopipe.tabular import write_csv

        # shortest exact repr of every value: reading back gives the same matrix
        return write_csv(self.to_dataframe(), path, index=True)

    def to_spillover(self):
        """As a :class:`cytopipe.fcs.Spillover` (to write ``$SPILLOVER`` into an FCS file)."""
        from cytopipe.fcs import Spillover

        return Spillover(matrix=np.array(self.matrix), channels=list(self.channels), source=self.source)

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Compensation)
            and self.channels == other.channels
            and np.array_equal(self.matrix, other.matrix)
        )

    __hash__ = None  # type: ignore[assignment]  # mutable-looking numpy payload: not hashable

    def __repr__(self) -> str:
        return f"Compensation({len(self.channels)} channels, source={self.source!r})"

    # --- application -----------------------------------------------------------------------
    def columns_in(self, channel_names: Sequence[str], file: Any = None) -> np.ndarray:
        """Column index of each matrix channel in ``channel_names`` (any order)."""
        names = [str(n) for n in channel_names]
        positions: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            positions.setdefault(n, []).append(i)
        missing = [c for c in self.channels if c not in positions]
        if missing:
            raise CompensationError(
                f"the spillover matrix ({self.source}) names channels that are not in the file: {missing}; "
                f"the file's channels are {names}. Use the matrix that belongs to this panel/instrument",
                file=file,
                channel=missing[0],
            )
        dup = [c for c in self.channels if len(positions[c]) > 1]
        if dup:
            raise CompensationError(
                f"channel {dup[0]!r} of the spillover matrix occurs {len(positions[dup[0]])} times in the file",
                file=file,
                channel=dup[0],
            )
        return np.array([positions[c][0] for c in self.channels], dtype=np.intp)

    def apply(
        self, events: np.ndarray, channel_names: Sequence[str], *, inplace: bool = False, file: Any = None
    ) -> np.ndarray:
        """Compensate the matrix's columns of ``events`` (events x channels); float32 result."""
        idx = self.columns_in(channel_names, file)
        if inplace:
            if not isinstance(events, np.ndarray) or events.dtype != np.float32 or not events.flags.writeable:
                raise CompensationError(
                    "in-place compensation needs a writeable float32 event matrix; pass inplace=False",
                    file=file,
                )
            out = events
        else:
            out = np.array(events, dtype=np.float32, copy=True, order="C")
        if out.ndim != 2 or out.shape[1] != len(channel_names):
            raise CompensationError(
                f"events have shape {out.shape} but {len(channel_names)} channel names were given", file=file
            )
        if self.is_identity:
            return out
        _apply_inverse(out, idx, self._inverse.astype(np.float32))
        return out


def _apply_inverse(events: np.ndarray, idx: np.ndarray, inv32: np.ndarray) -> None:
    """events[:, idx] = events[:, idx] @ inv32, in row blocks, on one BLAS thread.

    When the matrix channels fill a contiguous run of columns (in any order), the inverse is
    permuted to file order and applied to the slice, which avoids gathering and scattering the
    columns (3x slower). BLAS runs single-threaded: for a 16 x 16 product its threads only
    contend (5x slower on a busy 2-core machine), and samples run in parallel processes anyway.
    """
    from cytopipe.threads import one_thread

    k = len(idx)
    lo = int(idx.min())
    where: slice | np.ndarray = idx
    matrix = inv32
    if int(idx.max()) - lo + 1 == k:  # a permutation of lo..lo+k-1
        pos = idx - lo
        matrix = np.empty_like(inv32)
        matrix[np.ix_(pos, pos)] = inv32
        where = slice(lo, lo + k)
    out = np.empty((min(_ROW_BLOCK, events.shape[0]), k), dtype=np.float32)  # reused: no page faults
    with one_thread():
        for r0 in range(0, events.shape[0], _ROW_BLOCK):
            block = events[r0 : r0 + _ROW_BLOCK]
            res = out[: block.shape[0]]
            np.matmul(block[:, where], matrix, out=res)
            block[:, where] = res


def compensate(
    sample_or_events: Any,
    comp: Compensation | Any | str | Path | None = "file",
    channels: Sequence[str] | None = None,
    *,
    inplace: bool = False,
) -> Any:
    """Compensate a Sample or an event matrix.

    ``comp``: a :class:`Compensation`, a ``Spillover``, a path to a matrix CSV, ``"file"`` (the
    Sample's own spillover keyword; the default) or ``"none"``/``None`` (no change). For an event
    array, ``channels`` gives its column names (``$PnN``). Returns the same kind as the input: a
    Sample (a new one unless ``inplace``) or a float32 array. Channels not in the matrix are left
    as they are.
    """
    is_sample = hasattr(sample_or_events, "events") and hasattr(sample_or_events, "channels")
    file = getattr(sample_or_events, "path", None) if is_sample else None
    if is_sample:
        events = sample_or_events.events
        names = list(channels) if channels is not None else list(sample_or_events.channels["pnn"])
    else:
        events = sample_or_events
        if channels is None:
            raise CompensationError("compensating an event array needs channels= (its $PnN column names)")
        names = list(channels)
    resolved = _resolve_comp(comp, sample_or_events if is_sample else None)
    if resolved is None:
        out = events if inplace else np.array(events, dtype=np.float32, copy=True, order="C")
    else:
        out = resolved.apply(events, names, inplace=inplace, file=file)
    if not is_sample:
        return out
    if inplace:
        sample_or_events.events = out
        return sample_or_events
    return dataclasses.replace(sample_or_events, events=out)


def _resolve_comp(comp: Any, sample: Any) -> Compensation | None:
    if isinstance(comp, Compensation):
        return comp
    if comp is None or (isinstance(comp, str) and comp.strip().lower() in ("none", "identity", "")):
        return None
    if isinstance(comp, str) and comp.strip().lower() == "file":
        if sample is None:
            raise CompensationError("comp='file' needs a Sample (an event array has no spillover keyword)")
        return Compensation.from_sample(sample)
    if hasattr(comp, "matrix") and hasattr(comp, "channels"):
        return Compensation.from_spillover(comp)
    if isinstance(comp, (str, Path)):
        return Compensation.from_csv(comp)
    raise CompensationError(
        f"cannot use {type(comp).__name__} as a compensation; give a Compensation, CSV path, 'file' or 'none'"
    )


# ============================================================================================
# matrix text parsing
# ============================================================================================
def _parse_matrix_text(text: str, channels: Sequence[str] | None) -> tuple[list[str], np.ndarray]:
    lines = [ln.rstrip("\r") for ln in text.splitlines()]
    content = [(i + 1, ln) for i, ln in enumerate(lines) if ln.strip()]
    if not content:
        raise CompensationError("the matrix text is empty")
    # one-line FCS form: "n,ch1,...,chn,v11,...,vnn"
    if len(content) == 1 and "," in content[0][1]:
        first = content[0][1].split(",", 1)[0].strip()
        if _NUMBER.match(first):
            from cytopipe.errors import SpilloverError
            from cytopipe.fcs import parse_spillover

            try:
                spill = parse_spillover(content[0][1])
            except SpilloverError as exc:
                raise CompensationError(f"one-line spillover text: {exc.message}") from None
            return list(spill.channels), np.asarray(spill.matrix, dtype=np.float64)
    delim = _sniff_delimiter([ln for _, ln in content])
    rows: list[tuple[int, list[str]]] = []
    for lineno, ln in content:
        stripped = ln.strip()
        if stripped.startswith("#"):
            stripped = stripped[1:].strip()
            is_comment = True
        else:
            is_comment = False
        cells = [c.strip() for c in next(csv.reader(io.StringIO(stripped), delimiter=delim))]
        rows.append((lineno, cells if not is_comment else ["#"] + cells))

    def numeric(cells: list[str]) -> bool:
        return bool(cells) and all(_NUMBER.match(c) or c.upper() in ("NA", "NAN", "") for c in cells)

    def labelled_numeric(cells: list[str]) -> bool:
        return len(cells) > 1 and not _NUMBER.match(cells[0]) and cells[0] != "#" and numeric(cells[1:])

    first_data = next(
        (k for k, (_, cells) in enumerate(rows) if numeric(cells) or labelled_numeric(cells)),
        None,
    )
    if first_data is None:
        raise CompensationError("no numeric rows found; a matrix file needs one row of numbers per channel")
    header: list[str] | None = None
    if first_data > 0:
        cells = rows[first_data - 1][1]
        header = cells[1:] if cells and cells[0] == "#" else cells
    data = rows[first_data:]
    # everything after the matrix must be matrix rows or '#' comments: never drop data silently
    body: list[tuple[int, list[str]]] = []
    for lineno, cells in data:
        if cells and cells[0] == "#":
            continue
        if not (numeric(cells) or labelled_numeric(cells)):
            raise CompensationError(f"line {lineno} is not a row of numbers: {','.join(cells)!r}", row=lineno)
        body.append((lineno, cells))
    labelled = all(labelled_numeric(c) for _, c in body)
    row_labels = [c[0] for _, c in body] if labelled else None
    values = [c[1:] if labelled else c for _, c in body]
    if header is not None:
        # a header with a blank/label corner cell over a labelled matrix: drop the corner
        if labelled and len(header) == len(values[0]) + 1:
            header = header[1:]
        names = [h.strip().strip('"') for h in header]
    elif row_labels is not None:
        names = list(row_labels)
    elif channels is not None:
        names = [str(c) for c in channels]
    else:
        raise CompensationError(
            "the matrix has no header row naming its channels; add one or pass channels=[...] ($PnN names)"
        )
    if header is not None:
        _named_once(names, "the header names", "column")
    if channels is not None and header is not None and sorted(channels) != sorted(names):
        raise CompensationError(
            f"channels={list(channels)} do not match the matrix header {names}{_did_you_mean(channels, names)}; "
            "leave channels out to use the header"
        )
    n = len(names)
    for (lineno, _), vals in zip(body, values):
        if len(vals) != n:
            raise CompensationError(
                f"line {lineno} has {len(vals)} values but the matrix has {n} channels ({names})", row=lineno
            )
    if len(values) != n:
        raise CompensationError(
            f"the matrix has {len(values)} rows but {n} channels ({names}); a spillover matrix is square "
            "(one row per channel)"
        )
    matrix = np.empty((n, n))
    for r, ((lineno, _), vals) in enumerate(zip(body, values)):
        for c, v in enumerate(vals):
            if not _NUMBER.match(v):
                raise CompensationError(
                    f"line {lineno}, column {names[c]!r} is {v!r}, not a number; use 0 for no spillover",
                    row=lineno,
                    column=names[c],
                )
            matrix[r, c] = float(v)
    if row_labels is not None and header is not None:
        _named_once(row_labels, "the row labels name", "row")
        if sorted(row_labels) != sorted(names):
            raise CompensationError(
                f"row labels {row_labels} and header {names} name different channels"
                f"{_did_you_mean(row_labels, names)}; a spillover matrix lists the same channels in both"
            )
        order = [row_labels.index(c) for c in names]
        matrix = matrix[order]
    return names, matrix


def _named_once(names: Sequence[str], what: str, unit: str) -> None:
    """A matrix names each channel once: ``what`` ("the header names", "the row labels name")
    the same channel twice is an error naming it and where (``unit``: column or row, 1-based)."""
    for i, name in enumerate(names):
        if name in names[:i]:
            first = list(names).index(name)
            raise CompensationError(
                f"{what} the same channel twice: {name!r} ({unit}s {first + 1} and {i + 1} of the "
                "matrix); a spillover matrix names each channel once: rename or remove one",
                channel=name,
            )


def _did_you_mean(given: Sequence[str], names: Sequence[str]) -> str:
    """`` (did you mean ...?)`` for the ``given`` names not in ``names`` that nearly match one of
    them (``PE-A`` instead of ``PE_A``), else ''."""
    import difflib

    hints = []
    for name in given:
        if name not in names:
            near = difflib.get_close_matches(name, [n for n in names if n not in given], n=1, cutoff=0.6)
            if near:
                hints.append(f"{near[0]!r} instead of {name!r}")
    return f" (did you mean {', '.join(hints)}?)" if hints else ""


def _sniff_delimiter(lines: list[str]) -> str:
    sample = "\n".join(lines[:5])
    counts = {d: sample.count(d) for d in (",", "\t", ";")}
    return max(counts, key=lambda d: counts[d]) if max(counts.values()) > 0 else ","


# ============================================================================================
# spillover from single-stain controls
# ============================================================================================
@dataclass
class _Control:
    name: str
    events: np.ndarray  # cleaned, detectors only (n x k), float64
    primary: int  # index into detectors
    file: Any
    negatives: np.ndarray | None = None  # mask of the control's own dim events (no unstained)


def compute_spillover(
    controls: Mapping[str, Any] | pd.DataFrame | str | Path,
    unstained: Any | None = None,
    primary: Mapping[str, str] | None = None,
    *,
    channels: Sequence[str] | None = None,
    base_dir: str | Path | None = None,
    scatter_gate: bool = True,
    tolerance: float = 1e-4,
    max_iter: int = 25,
    min_events: int = 200,
    max_events: int = 50_000,
    z_positive: float = 6.0,
    seed: int = 0,
) -> tuple[Compensation, pd.DataFrame]:
    """Estimate a spillover matrix from single-stain controls (+ an unstained control).

    ``controls``: ``{name: Sample}`` (name = marker or file), a manifest CSV path, or a manifest
    DataFrame with ``file`` and ``control`` columns (``unstained``, ``single:<marker>``; files
    relative to ``base_dir``, by default the manifest's folder). ``primary``: ``{name: $PnN}`` of
    each control's own detector; otherwise the channel whose ``$PnS`` names the marker (resolved
    by :mod:`cytopipe.panel`, aliases included), else the detector where the control is brightest
    above the unstained. ``channels``: detectors of the matrix (default: the controls' spillover keyword
    channels, else every non-scatter, non-time channel); detectors without a control get an
    identity row.

    Per control: events saturated in any matrix detector are dropped and, with ``scatter_gate``,
    events outside the main population (robust z > 3 on log FSC-A and log SSC-A: debris,
    aggregates; and on log FSC-A/FSC-H: doublets). A control must have a positive population: at
    least ``min_events`` events brighter than the negative median + ``z_positive`` robust SDs in
    its primary detector (negatives: the unstained control, else the control's own dim events).
    The slope of each detector on the primary is the least-squares slope over the positive events
    with the negatives' covariance subtracted (this removes the autofluorescence that detectors
    share; see :func:`_residual_slopes`). Then, as AutoSpill, the controls are compensated with the
    estimate, the positives re-selected, the residual slopes measured the same way and folded in,
    until every residual is below ``tolerance`` (usually two to four rounds).

    Returns the :class:`Compensation` and a quality table with one row per (control, detector):
    ``source``, ``source_channel``, ``detector``, ``coefficient``, ``residual_slope``, ``se``,
    ``n_positive``, ``n_negative``, ``separation`` (positive median above the negatives, in
    negative robust SDs), ``flag``: ``ok``; ``not_converged``; ``dim`` (separation < 15: the
    control is too dim for an accurate estimate, use a brighter reagent or beads); ``large``
    (coefficient > 1: check the primary detector); ``negative`` (< -0.01); ``imprecise``
    (standard error > 0.005).
    """
    if isinstance(controls, (str, Path)):
        from cytopipe.manifest import load_manifest

        path = Path(controls)
        base_dir = base_dir if base_dir is not None else path.parent
        controls = load_manifest(path)
    if isinstance(controls, pd.DataFrame):
        controls, manifest_unstained, manifest_primary = _controls_from_manifest(controls, base_dir)
        unstained = unstained if unstained is not None else manifest_unstained
        primary = {**manifest_primary, **(primary or {})}
    if not isinstance(controls, Mapping) or not controls:
        raise CompensationError("compute_spillover needs at least one single-stain control ({name: Sample})")
    primary = dict(primary or {})
    unknown = sorted(set(primary) - set(controls))
    if unknown:
        raise CompensationError(
            f"primary= names controls that were not given: {unknown}; controls are {sorted(controls)}"
        )
    first = next(iter(controls.values()))
    detectors = list(channels) if channels is not None else _default_detectors(first)
    if not detectors:
        raise CompensationError(
            "no fluorescence detectors found; pass channels=[...]", file=getattr(first, "path", None)
        )
    rng = np.random.default_rng(seed)
    neg = None
    if unstained is not None:
        neg = _clean_events(unstained, detectors, "unstained", scatter_gate, max_events, rng)
    ctrls: list[_Control] = []
    for name, sample in controls.items():
        ev = _clean_events(sample, detectors, name, scatter_gate, max_events, rng)
        p = _find_primary(name, sample, ev, neg, detectors, primary.get(name))
        ctrls.append(_Control(name, ev, p, getattr(sample, "path", None)))
    claimed: dict[int, str] = {}
    for c in ctrls:
        if c.primary in claimed:
            raise CompensationError(
                f"controls {claimed[c.primary]!r} and {c.name!r} both have primary detector "
                f"{detectors[c.primary]!r}; give primary={{control: channel}} or drop one",
                channel=detectors[c.primary],
            )
        claimed[c.primary] = c.name
    k = len(detectors)
    S = np.eye(k)
    converged = False
    stats: dict[str, dict[str, Any]] = {}
    for iteration in range(max_iter + 1):
        # compensate the controls with the current estimate and measure what spillover is left
        last = iteration == max_iter
        inv = np.linalg.inv(S)
        negatives = _Negatives.of(neg @ inv) if neg is not None else None
        R = np.zeros((k, k))
        for c in ctrls:
            st = _residual_slopes(c, negatives, inv, min_events, z_positive, detectors, with_se=last)
            stats[c.name] = st
            R[c.primary] = st["slope"]
            R[c.primary, c.primary] = 0.0
        if np.max(np.abs(R)) < tolerance:
            converged = True
            if not last:  # one more pass for the standard errors at the final matrix
                for c in ctrls:
                    stats[c.name] = _residual_slopes(
                        c, negatives, inv, min_events, z_positive, detectors, True
                    )
            break
        if last:
            break
        # the true row is (e_p + r) S up to scale: fold the residual in and renormalise
        S = (np.eye(k) + R) @ S
        S /= np.diag(S)[:, None]
    comp = Compensation(S, tuple(detectors), "computed:single-stain controls")
    quality = _quality_table(ctrls, stats, S, detectors, converged, tolerance)
    quality.attrs["iterations"] = iteration
    quality.attrs["converged"] = converged
    return comp, quality


def _default_detectors(sample: Any) -> list[str]:
    spill = getattr(sample, "spillover", None)
    if spill is not None:
        return list(spill.channels)
    return [n for n in sample.channels["pnn"] if not _NON_FLUORESCENCE.match(str(n))]


def _clean_events(
    sample: Any,
    detectors: Sequence[str],
    name: str,
    scatter_gate: bool,
    max_events: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """Detector columns (float64) of the events that are finite, unsaturated and (optionally) in
    the main scatter population, subsampled to ``max_events``."""
    names = list(sample.channels["pnn"])
    file = getattr(sample, "path", None)
    missing = [d for d in detectors if d not in names]
    if missing:
        raise CompensationError(
            f"control {name!r} lacks detector(s) {missing}; its channels are {names}",
            file=file,
            channel=missing[0],
        )
    idx = [names.index(d) for d in detectors]
    ev = np.asarray(sample.events)
    X = ev[:, idx].astype(np.float64)
    keep = np.all(np.isfinite(X), axis=1)
    pnr = sample.channels["pnr"].to_numpy(dtype=float)[idx]
    top = np.where(pnr > 0, pnr, np.nanmax(np.where(np.isfinite(X), X, -np.inf), axis=0) + 1)
    keep &= np.all(X < 0.995 * top, axis=1)  # saturation breaks linearity
    if scatter_gate:
        # cells are roughly log-normal in scatter; debris sits far below, aggregates above
        for sc in ("FSC-A", "SSC-A"):
            if sc in names:
                v = ev[:, names.index(sc)].astype(np.float64)
                keep &= v > 0
                if not keep.any():
                    break
                lv = np.log(np.where(v > 0, v, 1.0))
                med = np.median(lv[keep])
                sd = 1.4826 * np.median(np.abs(lv[keep] - med))
                if sd > 0:
                    keep &= np.abs(lv - med) <= SCATTER_Z * sd
    if scatter_gate and "FSC-A" in names and "FSC-H" in names:
        # doublets have a larger area for their height
        a = ev[:, names.index("FSC-A")].astype(np.float64)
        h = ev[:, names.index("FSC-H")].astype(np.float64)
        keep &= (a > 0) & (h > 0)
        if keep.any():
            ratio = np.log(np.where(keep, a, 1.0) / np.where(keep, h, 1.0))
            med = np.median(ratio[keep])
            sd = 1.4826 * np.median(np.abs(ratio[keep] - med))
            if sd > 0:
                keep &= np.abs(ratio - med) <= SCATTER_Z * sd
    X = X[keep]
    if X.shape[0] > max_events:
        X = X[np.sort(rng.choice(X.shape[0], size=max_events, replace=False))]
    if X.shape[0] < 10:
        raise CompensationError(
            f"control {name!r} has only {X.shape[0]} usable events after removing saturated and "
            "off-scatter events",
            file=file,
        )
    return X


def _find_primary(
    name: str,
    sample: Any,
    ev: np.ndarray,
    neg: np.ndarray | None,
    detectors: Sequence[str],
    given: str | None,
) -> int:
    file = getattr(sample, "path", None)
    if given is not None:
        if given not in detectors:
            raise CompensationError(
                f"primary detector {given!r} of control {name!r} is not one of the matrix detectors {list(detectors)}",
                file=file,
                channel=given,
            )
        return list(detectors).index(given)
    # the channel whose $PnS names the control's marker (panel aliases: "CD279 (PD-1)" is PD-1)
    from cytopipe.errors import PanelError
    from cytopipe.panel import resolve_markers

    try:
        channel = resolve_markers(sample, [name], file=file)[name]
        if channel in detectors:
            return list(detectors).index(channel)
    except PanelError:
        pass  # the name is a file name or an unknown marker: find the primary from the data
    # otherwise: brightest above the negatives
    base = np.median(neg, axis=0) if neg is not None else np.quantile(ev, 0.05, axis=0)
    signal = np.quantile(ev, 0.99, axis=0) - base
    return int(np.argmax(signal))


@dataclass
class _Negatives:
    """Compensated negative events with the statistics every control needs."""

    events: np.ndarray
    median: np.ndarray
    robust_sd: np.ndarray
    centred: np.ndarray

    @classmethod
    def of(cls, N: np.ndarray) -> _Negatives:
        med = np.median(N, axis=0)
        return cls(N, med, 1.4826 * np.median(np.abs(N - med), axis=0), N - N.mean(axis=0))


def _residual_slopes(
    c: _Control,
    neg: _Negatives | None,
    inv: np.ndarray,
    min_events: int,
    z: float,
    detectors: Sequence[str],
    with_se: bool = False,
) -> dict[str, Any]:
    """Slopes of every compensated detector against the compensated primary over the positive
    events, corrected for autofluorescence:
    ``(cov_pos(j, p) - cov_neg(j, p)) / (var_pos(p) - var_neg(p))``.

    A plain least-squares slope over the positives (AutoSpill's regression) is biased upwards by
    the autofluorescence that detectors share (bigger cells are brighter everywhere): positive
    events carry ``stain * s + autofluorescence``, so their covariance is ``var(stain) s s^T`` plus
    the autofluorescence covariance, which the negatives measure. Subtracting it leaves the
    spillover direction ``s``. Detector noise is independent between detectors, so it only enters
    ``var(p)``, where it is small next to the spread of a positive population. Using positives only
    (not the whole control) keeps a positive subset with its own autofluorescence level (say T
    cells among PBMC) from biasing the slope; the price is that a dim control, whose positives
    are cut by the threshold, is less accurate (flagged ``dim``).
    """
    X = c.events @ inv
    p = c.primary
    if neg is None:
        if c.negatives is None:  # chosen once, on the raw primary: compensation barely moves it
            c.negatives = _internal_negatives(c.events[:, p])
        neg = _Negatives.of(X[c.negatives])
    threshold = neg.median[p] + z * max(float(neg.robust_sd[p]), 1e-9)
    positive = X[:, p] > threshold
    n_pos = int(np.count_nonzero(positive))
    no_signal = (
        f"control {c.name!r} has no clear positive population in its primary detector "
        f"{detectors[p]!r}: {n_pos} events above {threshold:.4g} (negative median {neg.median[p]:.4g} + "
        f"{z} robust SD), need {min_events}. Check the control and its primary detector"
    )
    if n_pos < min_events:
        raise CompensationError(no_signal, file=c.file, channel=detectors[p])
    P = X[positive]
    cx = P - P.mean(axis=0)
    cn = neg.centred
    delta = (cx.T @ cx[:, p]) / max(len(cx) - 1, 1) - (cn.T @ cn[:, p]) / max(len(cn) - 1, 1)
    if not delta[p] > 0:
        raise CompensationError(no_signal, file=c.file, channel=detectors[p])
    slope = delta / delta[p]
    se = np.full(len(slope), np.nan)
    if with_se:
        # delta-method standard error of the ratio of covariance differences
        gx, gn = cx * cx[:, [p]], cn * cn[:, [p]]
        var = (gx - slope * gx[:, [p]]).var(axis=0) / len(gx) + (gn - slope * gn[:, [p]]).var(axis=0) / len(
            gn
        )
        se = np.sqrt(var) / delta[p]
    separation = (float(np.median(P[:, p])) - neg.median[p]) / max(float(neg.robust_sd[p]), 1e-9)
    return {"slope": slope, "se": se, "n_pos": n_pos, "n_neg": int(len(cn)), "separation": separation}


def _internal_negatives(x: np.ndarray) -> np.ndarray:
    """Dim events of a control without an unstained one: below Otsu's threshold on
    arcsinh-scaled intensity (the split that best separates two populations; deterministic)."""
    t = np.arcsinh(x / 150.0)
    counts, edges = np.histogram(t, bins=512)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(counts)
    w1 = w0[-1] - w0
    s0 = np.cumsum(counts * centres)
    m0 = s0 / np.maximum(w0, 1)
    m1 = (s0[-1] - s0) / np.maximum(w1, 1)
    between = w0 * w1 * (m0 - m1) ** 2
    mask = t <= centres[int(np.argmax(between))]
    return mask if mask.sum() >= 10 else x <= np.quantile(x, 0.2)


def _quality_table(
    ctrls: Sequence[_Control],
    stats: Mapping[str, Mapping[str, Any]],
    S: np.ndarray,
    detectors: Sequence[str],
    converged: bool,
    tolerance: float,
) -> pd.DataFrame:
    rows = []
    for c in ctrls:
        st = stats[c.name]
        for j, det in enumerate(detectors):
            if j == c.primary:
                continue
            coef = float(S[c.primary, j])
            resid = float(st["slope"][j])
            se = float(st["se"][j])
            if not converged and abs(resid) >= tolerance:
                flag = "not_converged"
            elif st["separation"] < DIM_SEPARATION:
                flag = "dim"
            elif coef > 1.0:
                flag = "large"
            elif coef < -0.01:
                flag = "negative"
            elif se > 0.005:
                flag = "imprecise"
            else:
                flag = "ok"
            rows.append(
                {
                    "source": c.name,
                    "source_channel": detectors[c.primary],
                    "detector": det,
                    "coefficient": coef,
                    "residual_slope": resid,
                    "se": se,
                    "n_positive": st["n_pos"],
                    "n_negative": st["n_neg"],
                    "separation": round(float(st["separation"]), 2),
                    "flag": flag,
                }
            )
    return pd.DataFrame(rows)


def _controls_from_manifest(manifest: pd.DataFrame, base_dir: str | Path | None):
    """Read the controls a manifest lists: ``control`` = ``unstained`` or ``single:<marker>``."""
    from cytopipe.fcs import read_fcs

    for col in ("file", "control"):
        if col not in manifest.columns:
            raise CompensationError(f"the manifest has no {col!r} column", column=col)
    base = Path(base_dir) if base_dir is not None else Path(".")
    controls: dict[str, Any] = {}
    unstained = None
    primary: dict[str, str] = {}
    for i, row in manifest.reset_index(drop=True).iterrows():
        kind = str(row["control"]).strip() if pd.notna(row["control"]) else ""
        if not kind:
            continue
        path = base / str(row["file"])
        low = kind.lower()
        try:
            if low == "unstained":
                if unstained is not None:
                    raise CompensationError(
                        "the manifest lists more than one unstained control: for one control set per "
                        "site or batch, compute one matrix per set (compute_spillover_sets; "
                        "`compensation: source: controls` in a workflow does this by itself)",
                        row=i + 1,
                    )
                unstained = read_fcs(path)
            elif low.startswith("single:"):
                marker = kind.split(":", 1)[1].strip()
                if not marker:
                    raise CompensationError(
                        f"control {kind!r} names no marker; write single:<marker>", row=i + 1
                    )
                if marker in controls:
                    raise CompensationError(
                        f"two single-stain controls for {marker!r}: for one control set per site or "
                        "batch, compute one matrix per set (compute_spillover_sets)",
                        row=i + 1,
                    )
                controls[marker] = read_fcs(path)
                if (
                    "primary" in manifest.columns
                    and pd.notna(row.get("primary"))
                    and str(row["primary"]).strip()
                ):
                    primary[marker] = str(row["primary"]).strip()
        except CompensationError:
            raise
        except CytopipeError as exc:
            raise CompensationError(f"cannot read control {kind!r}: {exc}", file=path, row=i + 1) from None
    if not controls:
        raise CompensationError(
            "the manifest has no single-stain controls (control column 'single:<marker>')"
        )
    return controls, unstained, primary


SET_COLUMNS = ("batch", "site")


def control_sets(manifest: pd.DataFrame) -> tuple[str | None, dict[str, pd.DataFrame]]:
    """Split a manifest's control rows into control sets: ``(column, {value: rows})``.

    A multi-site trial stains and acquires one set of controls (one unstained, one single stain
    per marker) per site or per batch. The set column is the first of ``batch``, ``site`` within
    whose values no control kind repeats and whose values the samples also carry (so that each
    sample finds its set); with one set only, ``(None, {"": rows})``.
    """
    if "control" not in manifest.columns:
        raise CompensationError("the manifest has no 'control' column", column="control")
    kinds = manifest["control"].astype("string").str.strip().str.lower()
    rows = manifest[kinds.notna() & (kinds != "")]
    if rows.empty:
        raise CompensationError(
            "the manifest has no single-stain controls (control column 'single:<marker>')"
        )
    kind = rows["control"].astype(str).str.strip().str.lower()
    if not kind.duplicated().any():
        return None, {"": rows}
    samples = manifest[~manifest.index.isin(rows.index)]
    for col in SET_COLUMNS:
        if col not in rows.columns or rows[col].isna().any():
            continue
        key = rows[col].astype(str)
        if not samples.empty and not set(key) <= set(samples[col].dropna().astype(str)):
            continue  # e.g. controls acquired in their own batch: the samples cannot name it
        if not pd.DataFrame({"k": key, "c": kind}).duplicated().any():
            return col, {str(v): rows[key == v] for v in sorted(key.unique())}
    dup = sorted(set(kind[kind.duplicated()]))
    raise CompensationError(
        f"the manifest lists the controls {dup} more than once and no 'batch' or 'site' column tells "
        "the control sets apart; give each set's rows a batch (or site) value"
    )


def compute_spillover_sets(
    manifest: pd.DataFrame | str | Path, base_dir: str | Path | None = None, **kwargs: Any
) -> tuple[str | None, dict[str, tuple[Compensation, pd.DataFrame]]]:
    """One spillover matrix per control set of the manifest (see :func:`control_sets`):
    ``(column, {value: (compensation, quality)})``; keyword arguments go to
    :func:`compute_spillover`."""
    if isinstance(manifest, (str, Path)):
        from cytopipe.manifest import load_manifest

        path = Path(manifest)
        base_dir = base_dir if base_dir is not None else path.parent
        manifest = load_manifest(path)
    col, sets = control_sets(manifest)
    out = {}
    for value, rows in sets.items():
        try:
            out[value] = compute_spillover(rows, base_dir=base_dir, **kwargs)
        except CompensationError as exc:
            if col is None:
                raise
            raise CompensationError(f"control set {col}={value}: {exc}") from None
    return col, out


def spillover_difference(a: Compensation, b: Compensation) -> pd.DataFrame:
    """``a - b`` over the channels both share (rows = sources), e.g. to compare a computed
    matrix with the acquisition one."""
    common = [c for c in a.channels if c in b.channels]
    if not common:
        raise CompensationError("the two matrices share no channels")
    da, db = a.to_dataframe(), b.to_dataframe()
    return da.loc[common, common] - db.loc[common, common]


__all__ = [
    "Compensation",
    "compensate",
    "compute_spillover",
    "compute_spillover_sets",
    "control_sets",
    "spillover_difference",
    "MAX_CONDITION",
]
