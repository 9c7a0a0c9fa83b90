"""Typed settings tables: one mechanism for every section of a workflow (and the forms built on it).

A section is a :data:`Schema`: a mapping of keys to :class:`Field` (kind, default, help, limits)
or to nested sections. :func:`validate_section` checks a raw mapping (from YAML, CLI flags or a
web form) against it, fills the defaults and reports every mistake at once as one
:class:`~cytopipe.errors.WorkflowError` (unknown keys with a did-you-mean). Each module owns the
schema of its own settings (``cytopipe.qc.QC_SCHEMA``, ...); ``cytopipe.workflow`` assembles them.
This module sits at the bottom of the layers: it imports nothing of cytopipe but the errors.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cytopipe.errors import WorkflowError

_MISSING = object()

#: Samples drawn per gate in the report's gate review gallery: the one default of the workflow's
#: ``report.max_gallery``, of ``write_report`` and of the pipeline (defined here, at the bottom of
#: the layers, so that the workflow schema and the report both read it without importing each other).
MAX_GALLERY = 36

#: At most this many further panels per gate in the report's folded "other samples" figure: beyond
#: it a trial-scale report (thousands of files) would take minutes and hundreds of MB to draw; the
#: rest stay reachable in gate_review.csv and the review queue of ``cytopipe serve``.
MAX_GALLERY_REST = 300


@dataclass(frozen=True)
class Field:
    """One key of a workflow section.

    ``kind`` is one of ``str``, ``int``, ``float``, ``bool``, ``"path"`` (a file that must
    exist, resolved relative to the spec), ``"outpath"`` (a folder that may not exist yet),
    ``"list[str]"``, ``"int|auto"``, ``"bool|auto"``, ``"list[pair]"`` (``[[0, 12], ...]``),
    ``"mapping"`` (free-form dict, checked by its step).
    """

    kind: Any
    default: Any = None
    help: str = ""
    choices: tuple | None = None
    required: bool = False
    minimum: float | None = None
    maximum: float | None = None
    nullable: bool = True
    positive: bool = False  # strictly greater than 0 (a divisor such as an arcsinh cofactor)


Schema = dict[str, "Field | dict"]


def defaults(schema: Schema) -> dict[str, Any]:
    """The nested defaults of a schema (what an empty section validates to, paths unresolved)."""
    return {k: defaults(v) if isinstance(v, dict) else v.default for k, v in schema.items()}


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (sorted keys), hex."""
    text = json.dumps(jsonable(obj), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def validate_section(
    raw: Mapping, schema: Schema, base: Path, prefix: str, file: Path | None
) -> dict[str, Any]:
    """Check every key of ``raw`` against ``schema``; all mistakes are reported in one error."""
    problems: list[WorkflowError] = []
    out = _validate_into(raw, schema, base, prefix, file, problems)
    if len(problems) == 1:
        raise problems[0]
    if problems:
        listed = "\n".join(f"  - {p.context.get('key', '?')}: {p.message}" for p in problems)
        raise WorkflowError(f"{len(problems)} problems in the workflow:\n{listed}", file=file)
    return out


def _validate_into(
    raw: Mapping, schema: Schema, base: Path, prefix: str, file: Path | None, problems: list[WorkflowError]
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in raw:
        if not isinstance(key, str) or key not in schema:
            near = difflib.get_close_matches(str(key), list(schema), n=1, cutoff=0.6)
            hint = f"; did you mean {near[0]!r}?" if near else f"; known keys: {', '.join(schema)}"
            problems.append(WorkflowError(f"unknown key{hint}", file=file, key=prefix + str(key)))
    for key, spec in schema.items():
        name = prefix + key
        value = raw.get(key, _MISSING)
        try:
            if isinstance(spec, dict):
                if value is _MISSING or value is None:
                    value = {}
                if not isinstance(value, Mapping):
                    raise WorkflowError(
                        f"must be a mapping of settings, not {_describe(value)}", file=file, key=name
                    )
                out[key] = _validate_into(value, spec, base, name + ".", file, problems)
                continue
            if value is _MISSING:
                if spec.required:
                    raise WorkflowError(f"required key is missing ({spec.help})", file=file, key=name)
                value = spec.default
            out[key] = _check(value, spec, base, name, file)
        except WorkflowError as exc:
            problems.append(exc)
    return out


def _check(value: Any, spec: Field, base: Path, name: str, file: Path | None) -> Any:
    if value is None:
        if not spec.nullable or spec.required:
            raise WorkflowError(f"needs a value ({spec.help})", file=file, key=name)
        return None
    kind = spec.kind
    if kind in ("path", "outpath"):
        if not isinstance(value, str | Path) or str(value).strip() == "":
            raise WorkflowError(f"must be a path, not {_describe(value)}", file=file, key=name)
        path = Path(value).expanduser()
        path = (path if path.is_absolute() else base / path).resolve()
        if kind == "path" and not path.exists():
            # file=None: the paths came from command-line options, taken from the current folder
            origin = (
                f"the workflow file's folder {base}" if file is not None else f"the current folder {base}"
            )
            raise WorkflowError(
                f"file not found: {path} (relative paths are taken from {origin})", file=file, key=name
            )
        if kind == "path" and path.is_dir():
            raise WorkflowError(f"{path} is a folder; give the file", file=file, key=name)
        return path
    if kind == "int|auto":
        if value == "auto":
            return "auto"
        least = int(spec.minimum) if spec.minimum is not None else 1
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            what = "a positive integer" if least == 1 else f"an integer of at least {least}"
            raise WorkflowError(f"must be {what} or 'auto', not {_describe(value)}", file=file, key=name)
        return value
    if kind == "bool|auto":
        if value == "auto" or isinstance(value, bool):
            return value
        raise WorkflowError(f"must be true, false or 'auto', not {_describe(value)}", file=file, key=name)
    if kind == "list[pair]":
        if not isinstance(value, list) or not all(
            isinstance(v, list)
            and len(v) == 2
            and all(isinstance(x, int) and not isinstance(x, bool) for x in v)
            and v[0] < v[1]
            for v in value
        ):
            raise WorkflowError(
                f"must be a list of [start, end] week pairs (start < end), not {_describe(value)}",
                file=file,
                key=name,
            )
        return [list(v) for v in value]
    if kind == "mapping":
        if not isinstance(value, Mapping):
            raise WorkflowError(f"must be a mapping, not {_describe(value)}", file=file, key=name)
        return jsonable(value)
    if isinstance(kind, str) and kind.startswith("list["):
        item_type = {"list[str]": str, "list[int]": int, "list[float]": (int, float)}[kind]
        if not isinstance(value, list) or not all(
            isinstance(v, item_type) and not isinstance(v, bool) for v in value
        ):
            raise WorkflowError(
                f"must be a list of {kind[5:-1]} values, not {_describe(value)}", file=file, key=name
            )
        return list(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise WorkflowError(f"must be true or false, not {_describe(value)}", file=file, key=name)
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise WorkflowError(f"must be an integer, not {_describe(value)}", file=file, key=name)
    elif kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise WorkflowError(f"must be a number, not {_describe(value)}", file=file, key=name)
        value = float(value)
    elif kind is str:
        if not isinstance(value, str):
            raise WorkflowError(f"must be text, not {_describe(value)}", file=file, key=name)
    if spec.choices is not None and value not in spec.choices:
        near = difflib.get_close_matches(str(value), [str(c) for c in spec.choices], n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise WorkflowError(
            f"is {value!r}; choose one of {', '.join(map(str, spec.choices))}{hint}", file=file, key=name
        )
    if spec.minimum is not None and value < spec.minimum:
        raise WorkflowError(f"is {value}; must be at least {spec.minimum}", file=file, key=name)
    if spec.positive and not value > 0:
        raise WorkflowError(f"is {value}; must be greater than 0", file=file, key=name)
    if spec.maximum is not None and value > spec.maximum:
        raise WorkflowError(f"is {value}; must be at most {spec.maximum}", file=file, key=name)
    return value


def seed_argument(text: str) -> int:
    """A ``--seed`` option's value: an integer >= 0 (numpy's random generators refuse negative
    seeds; caught here, it is a usage error instead of every sample failing)."""
    import argparse

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, not {value}")
    return value


def _describe(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{value!r} ({type(value).__name__})"


def dataclass_kwargs(value: Any, cls: type, error: type[Exception], what: str) -> dict[str, Any]:
    """``value`` (a mapping of a settings dataclass's fields) as a new dict, refusing anything
    else and unknown keys with ``error`` (a :class:`~cytopipe.errors.CytopipeError` class);
    ``what`` names the settings in the message (``"clinical"``, ``"statistics"``)."""
    from dataclasses import fields

    if not isinstance(value, Mapping):
        raise error(f"{what} settings must be a dict, not {type(value).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(value) - known)
    if unknown:
        raise error(
            f"unknown {what} setting(s) {unknown}; known settings are {sorted(known)}", key=unknown[0]
        )
    return dict(value)


class Unhashable(TypeError):
    """A value whose content :func:`content_hash` cannot name (its user computes it every time)."""


def content_hash(obj: Any) -> str:
    """sha256 (hex) of ``obj``'s content: equal for equal content built in any process, different
    when any value, type, shape, dtype, order, column or index label differs. For caches of results
    computed from tables and arrays (the report's figures, the statistics' model fits): names no
    object identity, address or time. Numbers, strings, bytes, None, numpy arrays and scalars,
    pandas tables, series, indexes and arrays, lists, tuples, dicts, sets, dataclasses and paths;
    anything else raises :class:`Unhashable`."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h: Any, obj: Any) -> None:  # noqa: C901 - one flat dispatch on the argument's type
    import numpy as np  # (here: this module is imported by every command, most never hash a table)
    import pandas as pd

    def tag(text: str) -> None:
        h.update(_tagged(text))

    if obj is None or isinstance(obj, bool):
        tag(f"const:{obj!r}")
    elif isinstance(obj, int | np.integer | np.bool_):
        tag(f"{type(obj).__name__}:{int(obj)}")
    elif isinstance(obj, float | np.floating):
        tag(f"{type(obj).__name__}:" + struct.pack("<d", float(obj)).hex())
    elif isinstance(obj, str):
        tag("str")
        tag(obj)
    elif isinstance(obj, bytes):
        tag(f"bytes:{len(obj)}")
        h.update(obj)
    elif isinstance(obj, np.ndarray):
        tag(f"ndarray:{obj.dtype.str}:{obj.shape}")
        if obj.dtype.hasobject:
            _feed_items(h, list(obj.ravel(order="C")))
        else:
            h.update(np.ascontiguousarray(obj).tobytes())
    elif isinstance(obj, pd.DataFrame):
        tag(f"DataFrame:{obj.shape}")
        _feed(h, obj.index)
        _feed(h, obj.columns)
        for i in range(obj.shape[1]):
            _feed(h, obj.iloc[:, i].array)
        _feed(h, dict(obj.attrs))
    elif isinstance(obj, pd.Series):
        tag(f"Series:{len(obj)}")
        _feed(h, obj.name)
        _feed(h, obj.index)
        _feed(h, obj.array)
        _feed(h, dict(obj.attrs))
    elif isinstance(obj, pd.Index):
        tag(f"{type(obj).__name__}:{obj.dtype}:{len(obj)}")
        _feed(h, list(obj.names))
        _feed(h, obj.array if not isinstance(obj, pd.MultiIndex) else list(obj))
    elif isinstance(obj, pd.Categorical):
        tag(f"Categorical:{obj.ordered}")
        _feed(h, obj.categories)
        _feed(h, np.asarray(obj.codes))
    elif isinstance(obj, pd.api.extensions.ExtensionArray):
        tag(f"{type(obj).__name__}:{obj.dtype}:{len(obj)}")
        if isinstance(obj, pd.arrays.NumpyExtensionArray):
            _feed(h, obj.to_numpy())
        else:  # nullable ints, strings, booleans...: each value with its type (missing values named)
            _feed_items(h, list(obj.to_numpy(dtype=object, na_value=None)))
    elif obj is pd.NA or obj is pd.NaT:
        tag(f"const:{obj!r}")
    elif isinstance(obj, pd.Timestamp | pd.Timedelta):
        tag(f"{type(obj).__name__}:{obj.isoformat()}")
    elif isinstance(obj, list | tuple):
        tag(f"{type(obj).__name__}:{len(obj)}")
        _feed_items(h, obj)
    elif isinstance(obj, Mapping):  # insertion order kept: a figure draws in its arguments' order
        tag(f"{type(obj).__name__}:{len(obj)}")
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, set | frozenset):
        tag(f"{type(obj).__name__}:{len(obj)}")
        for text in sorted(content_hash(v) for v in obj):
            tag(text)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        tag(f"dataclass:{type(obj).__module__}.{type(obj).__qualname__}")
        for f in dataclasses.fields(obj):
            tag(f.name)
            _feed(h, getattr(obj, f.name))
    elif isinstance(obj, Path):
        tag(f"Path:{obj}")
    else:
        raise Unhashable(f"cannot name the content of a {type(obj).__module__}.{type(obj).__qualname__}")


def _feed_items(h: Any, items: Any) -> None:
    """``_feed`` of each item in turn. A sequence of plain scalars -- ints, floats, strings, bools
    and None (a histogram's counts, a range, a table's text column: the rows of a figure over a
    3,501-file study hold millions) -- goes in one update of the very bytes the items would feed
    one by one: the same hash, several times faster."""
    kinds = {type(v) for v in items}
    if kinds == {int}:  # the commonest case, without a lookup per value
        texts = [f"int:{v}".encode("ascii") for v in items]
        h.update(b"".join([_LENGTH(len(t)) + t for t in texts]))
    elif kinds <= _SCALARS.keys():
        h.update(b"".join([_SCALARS[type(v)](v) for v in items]))
    else:
        for v in items:
            _feed(h, v)


def _scalar_int(v: int) -> bytes:
    t = f"int:{v}".encode("ascii")
    return _LENGTH(len(t)) + t


def _scalar_float(v: float) -> bytes:
    t = b"float:" + _DOUBLE(v).hex().encode("ascii")
    return _LENGTH(len(t)) + t


def _scalar_str(v: str) -> bytes:
    t = v.encode("utf-8")
    return _STR_TAG + _LENGTH(len(t)) + t


_LENGTH = struct.Struct("<Q").pack
_DOUBLE = struct.Struct("<d").pack


def _tagged(text: str) -> bytes:
    """What ``_feed``'s ``tag(text)`` feeds: the UTF-8 length as 8 bytes, then the text."""
    data = text.encode("utf-8")
    return _LENGTH(len(data)) + data


#: what ``_feed`` feeds for a plain scalar of each type (None and bools are tagged constants, a
#: string is the tag "str" then its text): the bytes ``_feed_items`` joins
_STR_TAG = _tagged("str")
_SCALARS = {
    int: _scalar_int,
    float: _scalar_float,
    str: _scalar_str,
    bool: lambda v: _tagged(f"const:{v!r}"),
    type(None): lambda v: _tagged("const:None"),
}
