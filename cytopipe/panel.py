"""Panel resolution: which channel (``$PnN``) of a file carries a marker.

Gating templates speak of markers (``CD4``, ``FOXP3``, ``PD-1``, ``Viability``); FCS files name
their detectors (``BV605-A``) and put the marker, spelled in many ways, in ``$PnS``
(``"CD4 BV605"``, ``"BV605-CD4"``, ``"CD279 (PD-1)"``, ``"176Yb_CD127_IL-7Ra"``, ``"Zombie Aqua"``).
:func:`resolve_markers` finds the one channel per marker:

1. an explicit ``mapping`` (marker -> ``$PnN``) always wins;
2. scatter and time (``FSC-A``, ``FSC-H``, ``SSC-A``, ``Time`` ...) resolve by ``$PnN``;
3. otherwise the marker and its aliases (``cytopipe/data/marker_aliases.csv``) are compared with
   each channel's ``$PnS`` after normalisation (case, spaces, hyphens, underscores, dots, slashes
   and brackets are ignored). Matches are ranked: the whole ``$PnS`` is the marker (best); the
   ``$PnS`` is the marker plus fluorochrome or isotope words; the marker is one word among others
   (``"VIVID / CD14"``). The best rank must name exactly one channel (an ``-A`` channel wins over
   its ``-H``/``-W`` twins); otherwise :class:`~cytopipe.errors.PanelError` names the file, the
   marker and the channels seen, and says to add a mapping;
4. a channel with a blank ``$PnS`` may still match when its ``$PnN`` is the marker itself.
"""

from __future__ import annotations

import csv
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd

from cytopipe.errors import PanelError

ALIAS_FILE = Path(__file__).with_name("data") / "marker_aliases.csv"

#: channels resolved by ``$PnN`` (normalised), never by ``$PnS``
SCATTER_TIME = ("FSC-A", "FSC-H", "FSC-W", "SSC-A", "SSC-H", "SSC-W", "SSC-B-A", "SSC-B-H", "Time")

# match quality, best first
EXACT, WITH_FLUOR, MENTION, BY_NAME = 3, 2, 1, 0
_QUALITY_TEXT = {
    EXACT: "$PnS is the marker",
    WITH_FLUOR: "$PnS is the marker plus fluorochrome words",
    MENTION: "$PnS mentions the marker",
    BY_NAME: "$PnN is the marker",
}

_GREEK = str.maketrans({"α": "a", "β": "b", "γ": "g", "δ": "d", "κ": "k", "λ": "l"})
_SPLIT = re.compile(r"[\s_\-./\\()\[\]{}:;,|+]+")

# Words that name a fluorochrome, detector or metal tag rather than a marker (normalised).
_FLUOR_WORDS = {
    "fitc",
    "pe",
    "percp",
    "apc",
    "cy5",
    "cy55",
    "cy7",
    "pecy5",
    "pecy55",
    "pecy7",
    "percpcy55",
    "percpcy5",
    "percpef710",
    "apccy7",
    "apch7",
    "h7",
    "apcr700",
    "apcfire750",
    "apcfire810",
    "fire",
    "pedazzle594",
    "dazzle",
    "dazzle594",
    "petexasred",
    "texas",
    "red",
    "petr",
    "ecd",
    "pacific",
    "blue",
    "pacificblue",
    "pb",
    "pacificorange",
    "orange",
    "amcyan",
    "alexa",
    "fluor",
    "af",
    "ax",
    "qdot",
    "qd",
    "bv",
    "buv",
    "bb",
    "bb515",
    "bb700",
    "v450",
    "v500",
    "horizon",
    "sparkblue550",
    "spark",
    "nir",
    "efluor",
    "ef",
    "vio770",
    "pevio770",
    "percpvio700",
    "kiravia",
    "a",
    "h",
    "w",
    "di",
    "dd",
    "beads",
    "cells",
    "cell",
}
_FLUOR_PATTERNS = (
    re.compile(r"^(bv|buv|bb|af|ax|alexa|alexafluor|qdot|qd|efluor|ef|v|apcfire|percpef|sb|nfluor)\d{3}$"),
    re.compile(r"^\d{2,3}[a-z]{1,2}$"),  # CyTOF isotope prefix: 176yb, 89y
    re.compile(r"^[a-z]{1,2}\d{2,3}(di|dd)$"),  # Yb176Di
    # bare metal tags (Nd145); "cd" is left out on purpose: CD112 is a marker, not cadmium
    re.compile(r"^(y|la|ce|pr|nd|sm|eu|gd|tb|dy|ho|er|tm|yb|lu|in|rh|pd|pt|ir|cs|ba|sn|xe|bi|pb)\d{2,3}$"),
    re.compile(r"^\d{3}$"),  # bare wavelengths (488, 647, 700)
)


def normalize(text: str) -> str:
    """Lower-case ``text`` and drop spaces, hyphens, underscores, dots, slashes and brackets."""
    text = unicodedata.normalize("NFKC", str(text)).translate(_GREEK).lower()
    return _SPLIT.sub("", text)


def _tokens(text: str) -> list[str]:
    text = unicodedata.normalize("NFKC", str(text)).translate(_GREEK).lower()
    return [t for t in _SPLIT.split(text) if t]


def _is_fluor(token: str) -> bool:
    return token in _FLUOR_WORDS or any(p.match(token) for p in _FLUOR_PATTERNS)


# --------------------------------------------------------------------------------------------
# alias table
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Group:
    """One canonical marker with its literal and regular-expression aliases (normalised)."""

    name: str
    literals: frozenset[str]
    patterns: tuple[re.Pattern, ...] = ()

    def matches(self, normalized: str) -> bool:
        return normalized in self.literals or any(p.search(normalized) for p in self.patterns)


@dataclass
class AliasTable:
    """Marker aliases: canonical marker name -> accepted spellings."""

    groups: dict[str, _Group] = field(default_factory=dict)
    _index: dict[str, str] = field(default_factory=dict)  # normalised literal -> canonical

    @classmethod
    def from_csv(cls, path: str | Path = ALIAS_FILE) -> AliasTable:
        path = Path(path)
        table = cls()
        try:
            lines = [ln for ln in path.read_text(encoding="utf-8").splitlines() if not ln.startswith("#")]
        except OSError as exc:
            raise PanelError(f"cannot read the marker alias table: {exc.strerror}", file=path) from None
        reader = csv.DictReader(lines)
        if reader.fieldnames is None or not {"marker", "aliases"} <= set(reader.fieldnames):
            raise PanelError("alias table needs the columns 'marker,aliases'", file=path)
        for row_number, row in enumerate(reader, start=2):
            marker = (row.get("marker") or "").strip()
            if not marker:
                raise PanelError("row without a marker name", file=path, row=row_number)
            aliases = [a.strip() for a in (row.get("aliases") or "").split("|") if a.strip()]
            table.add(marker, aliases)
        return table

    def add(self, marker: str, aliases: Iterable[str]) -> None:
        """Add (or extend) the alias group of ``marker``."""
        literals = {normalize(marker)}
        patterns = []
        for alias in aliases:
            if alias.startswith("re:"):
                patterns.append(re.compile(alias[3:]))
            else:
                literals.add(normalize(alias))
        old = self.groups.get(marker)
        if old is not None:
            literals |= old.literals
            patterns = list(old.patterns) + patterns
        self.groups[marker] = _Group(marker, frozenset(literals), tuple(patterns))
        for lit in literals:
            self._index.setdefault(lit, marker)

    def canonical(self, name: str) -> str:
        """Canonical marker name for ``name`` (``"CD279"`` -> ``"PD-1"``); ``name`` if unknown."""
        key = normalize(name)
        if key in self._index:
            return self._index[key]
        for group in self.groups.values():
            if group.matches(key):
                return group.name
        return name

    def group(self, name: str) -> _Group:
        """The alias group of a marker; an unknown marker is its own one-spelling group."""
        canonical = self.canonical(name)
        if canonical in self.groups:
            return self.groups[canonical]
        return _Group(name, frozenset({normalize(name)}))


@lru_cache(maxsize=1)
def default_aliases() -> AliasTable:
    """The alias table shipped with cytopipe (``cytopipe/data/marker_aliases.csv``)."""
    return AliasTable.from_csv(ALIAS_FILE)


def canonical_marker(name: str, aliases: AliasTable | None = None) -> str:
    """Canonical spelling of a marker name (``"CD279"`` -> ``"PD-1"``, ``"Foxp3"`` -> ``"FOXP3"``)."""
    return (aliases or default_aliases()).canonical(name)


# --------------------------------------------------------------------------------------------
# channels
# --------------------------------------------------------------------------------------------
def _channel_rows(channels: Any) -> tuple[list[tuple[str, str]], Any]:
    """(pnn, pns) pairs and the file path (if known) from a Sample, table or list."""
    path = getattr(channels, "path", None)
    table = getattr(channels, "channels", None)
    if isinstance(table, pd.DataFrame):
        channels = table
    if isinstance(channels, pd.DataFrame):
        if "pnn" not in channels.columns:
            raise PanelError("channel table needs a 'pnn' column", file=path)
        pns = channels["pns"] if "pns" in channels.columns else [""] * len(channels)
        rows = [(str(n), "" if pd.isna(s) else str(s)) for n, s in zip(channels["pnn"], pns)]
        return rows, path
    rows = []
    for item in channels:
        if isinstance(item, str):
            rows.append((item, ""))
        else:
            pnn, pns = item[0], item[1] if len(item) > 1 else ""
            rows.append((str(pnn), "" if pns is None else str(pns)))
    return rows, path


def _describe(rows: Sequence[tuple[str, str]]) -> str:
    return ", ".join(f"{n} [{s}]" if s.strip() else n for n, s in rows)


def _match_quality(group: _Group, pns: str) -> int | None:
    """How well ``pns`` names the marker of ``group`` (EXACT/WITH_FLUOR/MENTION) or None."""
    if not pns.strip():
        return None
    if group.matches(normalize(pns)):
        return EXACT
    tokens = _tokens(pns)
    rest = [t for t in tokens if not _is_fluor(t)]
    if rest and _partition(group, rest):
        return WITH_FLUOR
    n = len(tokens)
    for i in range(n):
        for j in range(i + 1, n + 1):
            if group.matches("".join(tokens[i:j])):
                return MENTION
    return None


def _partition(group: _Group, tokens: Sequence[str]) -> bool:
    """True when ``tokens`` split into consecutive runs that are each an alias of ``group``."""
    n = len(tokens)
    ok = [False] * (n + 1)
    ok[0] = True
    for j in range(1, n + 1):
        ok[j] = any(ok[i] and group.matches("".join(tokens[i:j])) for i in range(j))
    return ok[n]


def _stem(pnn: str) -> str:
    return re.sub(r"[-_ ]?[AHW]$", "", pnn.strip(), flags=re.IGNORECASE)


@dataclass
class Panel:
    """Markers a template needs plus an optional explicit mapping (marker -> ``$PnN``).

    ``Panel(["CD4", "FOXP3"]).resolve(sample)`` resolves every marker once per file;
    ``unresolved(sample)`` lists markers that cannot be resolved (without raising).
    """

    markers: Sequence[str]
    mapping: Mapping[str, str] | None = None
    aliases: AliasTable | None = None

    def __post_init__(self) -> None:
        self.markers = list(dict.fromkeys(self.markers))
        self.aliases = self.aliases or default_aliases()
        self._mapping = {}
        for marker, pnn in (self.mapping or {}).items():
            self._mapping[self._key(marker)] = str(pnn)

    def _key(self, marker: str) -> str:
        return normalize(self.aliases.canonical(marker))

    def candidates(self, marker: str, channels: Any) -> list[tuple[str, int]]:
        """Every channel that could carry ``marker``, as (``$PnN``, quality) best first."""
        rows, _ = _channel_rows(channels)
        return _candidates(self.aliases, marker, rows)

    def resolve(self, channels: Any, file: str | Path | None = None) -> dict[str, str]:
        """Marker -> ``$PnN`` for every marker of the panel; raises PanelError otherwise."""
        rows, path = _channel_rows(channels)
        file = file if file is not None else path
        return {m: self._resolve_one(m, rows, file) for m in self.markers}

    def unresolved(self, channels: Any, file: str | Path | None = None) -> list[str]:
        """Markers of the panel that cannot be resolved in ``channels`` (missing or ambiguous)."""
        rows, path = _channel_rows(channels)
        missing = []
        for marker in self.markers:
            try:
                self._resolve_one(marker, rows, file if file is not None else path)
            except PanelError:
                missing.append(marker)
        return missing

    def resolve_carried(
        self, channels: Any, file: str | Path | None = None
    ) -> tuple[dict[str, str], list[str]]:
        """Marker -> ``$PnN`` for the markers the file carries, and the markers no channel carries
        (in panel order); an ambiguous or mis-mapped marker still raises PanelError."""
        rows, path = _channel_rows(channels)
        file = file if file is not None else path
        found: dict[str, str] = {}
        absent: list[str] = []
        for marker in self.markers:
            if self._mapping.get(self._key(marker)) is None and not _candidates(self.aliases, marker, rows):
                absent.append(marker)
            else:
                found[marker] = self._resolve_one(marker, rows, file)
        return found, absent

    def _resolve_one(self, marker: str, rows: Sequence[tuple[str, str]], file: Any) -> str:
        pnns = [n for n, _ in rows]
        explicit = self._mapping.get(self._key(marker))
        if explicit is not None:
            if explicit in pnns:
                return explicit
            folded = [n for n in pnns if n.lower() == explicit.lower()]
            if len(folded) == 1:
                return folded[0]
            raise PanelError(
                f"the template's `panel:` section (or `mapping=` in Python) sends marker {marker!r} to "
                f"channel {explicit!r}, but the file has no such $PnN; channels seen: {_describe(rows)}. "
                f"Change it to one of these $PnN, {_panel_hint(marker, _ANY_CHANNEL, python=False)}",
                file=file,
                marker=marker,
            )
        found = _candidates(self.aliases, marker, rows)
        if not found:
            raise PanelError(
                f"no channel carries marker {marker!r} (aliases: "
                f"{', '.join(sorted(self.aliases.group(marker).literals))}); channels seen: "
                f"{_describe(rows)}. If one of these channels carries it under another label, name it in "
                f"the template's `panel:` section, {_panel_hint(marker, _ANY_CHANNEL)}",
                file=file,
                marker=marker,
            )
        best = found[0][1]
        top = [n for n, q in found if q == best]
        if len(top) > 1:
            # An -A channel wins over its -H/-W twins carrying the same $PnS.
            stems = {_stem(n) for n in top}
            area = [n for n in top if re.search(r"[-_ ]?A$", n.strip(), re.IGNORECASE)]
            if len(stems) == 1 and len(area) == 1:
                return area[0]
            pns_of = dict(rows)
            listed = ", ".join(f"{n} [{pns_of.get(n, '')}]" for n in top)
            raise PanelError(
                f"marker {marker!r} is ambiguous: {len(top)} channels match equally well "
                f"({_QUALITY_TEXT[best]}): {listed}; channels seen: {_describe(rows)}. Choose one in the "
                f"template's `panel:` section, {_panel_hint(marker, top[0])}",
                file=file,
                marker=marker,
            )
        return top[0]


_ANY_CHANNEL = "<the channel's $PnN>"


def _panel_hint(marker: str, channel: str, python: bool = True) -> str:
    """What a user writes in the template's ``panel:`` (and the command that checks it)."""
    keyword = " (or `mapping=` in Python)" if python else ""
    return (
        f'e.g. `panel: {{{marker}: "{channel}"}}`{keyword}; '
        "`cytopipe template check FILES --template TEMPLATE` shows how every marker resolves."
    )


def _candidates(aliases: AliasTable, marker: str, rows: Sequence[tuple[str, str]]) -> list[tuple[str, int]]:
    key = normalize(marker)
    if key in {normalize(s) for s in SCATTER_TIME}:
        return [(n, EXACT) for n, _ in rows if normalize(n) == key]
    group = aliases.group(marker)
    found = []
    for pnn, pns in rows:
        quality = _match_quality(group, pns)
        if quality is None and not pns.strip():
            # blank $PnS: accept a $PnN that is the marker itself (e.g. "CD4" or "CD4-A")
            name = normalize(_stem(pnn))
            if name in group.literals or normalize(pnn) in group.literals:
                quality = BY_NAME
        if quality is None and normalize(pnn) == key:
            quality = BY_NAME  # a template may name a detector directly ("FL1-H")
        if quality is not None:
            found.append((pnn, quality))
    found.sort(key=lambda item: -item[1])
    return found


def resolve_markers(
    channels: Any,
    markers: Iterable[str],
    mapping: Mapping[str, str] | None = None,
    file: str | Path | None = None,
) -> dict[str, str]:
    """Resolve each marker to the ``$PnN`` of the channel that carries it.

    ``channels`` is a :class:`~cytopipe.fcs.Sample`, its channel table (columns ``pnn``, ``pns``)
    or a list of ``(pnn, pns)`` pairs. ``mapping`` (marker -> ``$PnN``) overrides the aliases.
    Raises :class:`~cytopipe.errors.PanelError` for a missing or ambiguous marker.

    >>> resolve_markers([("BV421-A", "CD25 BV421"), ("BV711-A", "CD279 (PD-1)")], ["CD25", "PD-1"])
    {'CD25': 'BV421-A', 'PD-1': 'BV711-A'}
    """
    return Panel(list(markers), mapping=mapping).resolve(channels, file=file)


#: label words that name no marker ("empty", "not used")
_NO_MARKER_WORDS = {
    "empty",
    "blank",
    "none",
    "na",
    "nan",
    "null",
    "unused",
    "unlabeled",
    "unlabelled",
    "not",
    "used",
}
# prefixes that do not change the marker: "CD" before a number ("CD4" and "4"), "anti", "h(u)"
_LOOSE_PREFIX = re.compile(r"^(anti)?((human|hu|h)?cd(?=\d))?")


def label_names_marker(pns: str, marker: str, aliases: AliasTable | None = None) -> bool | None:
    """Whether a channel's stain label (``$PnS``) names ``marker``: True (an alias of it, or it
    with fluorochrome or isotope words: ``"PD1 BV421"`` for ``PD-1``, ``"FoxP3"`` for ``FOXP3``,
    ``"hCD25"`` for ``CD25``), False when it names another marker (``"CD14"`` for ``CD4``,
    ``"CD57"`` for ``CD56``, ``"BC1"`` for ``PD-1``, compared after case, spaces, hyphens and
    prefixes such as ``CD`` are ignored), None when it names none (blank, only fluorochrome or
    isotope words, ``"empty"``). A suggestion for a missing marker must never be False."""
    words = [t for t in _tokens(pns) if not _is_fluor(t) and t not in _NO_MARKER_WORDS]
    if not words:
        return None
    group = (aliases or default_aliases()).group(marker)
    if _match_quality(group, pns) is not None:
        return True
    spellings = {_LOOSE_PREFIX.sub("", lit) for lit in group.literals}
    for i in range(len(words)):
        for j in range(i + 1, len(words) + 1):
            if _LOOSE_PREFIX.sub("", "".join(words[i:j])) in spellings:
                return True
    return False


def channel_markers(channels: Any, aliases: AliasTable | None = None) -> dict[str, str | None]:
    """``$PnN`` -> canonical marker named by its ``$PnS`` (None for blank or unknown text)."""
    aliases = aliases or default_aliases()
    rows, _ = _channel_rows(channels)
    out: dict[str, str | None] = {}
    for pnn, pns in rows:
        best, best_q = None, -1
        for group in aliases.groups.values():
            q = _match_quality(group, pns)
            if q is not None and q > best_q:
                best, best_q = group.name, q
        if best is None and pns.strip():
            best = pns.strip()
        out[pnn] = best
    return out
