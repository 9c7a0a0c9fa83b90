"""Before any work: which template markers each file carries, and ``cytopipe template check``.

* :func:`marker_table` resolves every marker of a template in every file's channel table (headers
  only, no events): marker -> ``$PnN`` per file, or missing.
* :func:`missing_everywhere` lists the markers absent from EVERY file of a study, each with the
  populations that need it, a channel whose stain label names it (never one whose label names
  another marker: CD14 is not CD4) or else the file(s)' channel list, and the YAML to add under
  ``panel:``;
  :func:`check_study_markers` turns that into ONE error (``cytopipe gate`` / ``cytopipe run`` stop
  with exit 2 before gating anything) unless ``missing_markers: skip``, when those populations are
  reported "not measured" and everything else is gated.
* ``cytopipe template check FILES --template T`` prints, per population, its markers resolved to
  channels, its gate source (fitted / control / reference / fixed / boolean) and what it falls back
  to, which populations ``cytopipe gate`` would report "not measured" in each file and which files
  it would refuse (a ``compensation: file`` template, a file without a spillover matrix), so a
  scientist can adapt a template to a new panel in minutes (docs/gating.md). Exit code 0 when
  every population can be gated in every file, 3 when the check found problems (listed).
"""

from __future__ import annotations

import argparse
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from cytopipe.errors import PanelError
from cytopipe.gating.gates import BooleanGate

MISSING_POLICIES = ("stop", "skip")


_TWO_SCATTER = (
    "(a gate on two scatter channels of one kind, such as Singlets on FSC-A x FSC-H, needs both: "
    "with a single FSC channel, leave that population out of your copy of the template and give its "
    "children its parent)"
)


@dataclass
class MissingMarker:
    """A template marker no file carries. ``closest``: channels whose stain label names the marker
    (an unlisted spelling, never a label naming another marker nor a channel another marker of
    the template uses), best first; ``unlabelled``: unused fluorescence channels with no marker in
    their label; ``channels``: every channel of the file(s), to choose from when nothing is
    suggested."""

    marker: str
    populations: list[str]
    closest: list[str]
    files: int
    template_file: str = ""  # the template's YAML, named in the message (the panel lives there)
    unlabelled: list[str] = field(default_factory=list)
    channels: list[str] = field(default_factory=list)

    def yaml(self) -> str:
        channel = self.closest[0].split(" [")[0] if self.closest else "<$PnN of the channel>"
        return f"panel:\n  {self.marker}: {channel}"

    def message(self, list_channels: bool = True) -> str:
        """The marker's report; ``list_channels=False``: the channel list is printed once below
        the reports of all missing markers (:func:`missing_markers_text`)."""
        from cytopipe.gating._adapters import is_scatter_or_time

        m = self.marker
        where = f"the template YAML {self.template_file!r}" if self.template_file else "the template YAML"
        head = (
            f"marker {m!r} is in none of the {self.files} file(s); populations needing it: "
            f"{', '.join(self.populations)}; "
        )
        if self.closest and is_scatter_or_time(m):
            return (
                f"{head}scatter and time channels are found by their $PnN, and no channel is named {m}; "
                f"channels named like it: {', '.join(self.closest)}. If one of these is {m}, add to "
                f"{where}:\n{self.yaml()}\n{_TWO_SCATTER}"
            )
        if self.closest:
            return (
                f"{head}closest channel labels: {', '.join(self.closest)}. If one of these carries {m}, "
                f"add to {where}:\n{self.yaml()}"
            )
        if is_scatter_or_time(m):
            listed = f": {', '.join(self.channels)};" if list_channels else " (listed below)"
            return (
                f"{head}scatter and time channels are found by their $PnN, and no channel is named {m} "
                f"nor like it. If the file(s) have it under another name, find it among the channels"
                f"{listed} and add to {where}:\n{self.yaml()}\n{_TWO_SCATTER}"
            )
        blank = (
            f"; channels without a marker in their label: {', '.join(self.unlabelled)}"
            if self.unlabelled
            else ""
        )
        listed = f" ($PnN [$PnS]): {', '.join(self.channels)};" if list_channels else " (listed below)"
        return (
            f"{head}no channel to suggest: no channel's stain label ($PnS) names {m} (the others name "
            f"another marker, or carry another marker of the template){blank}. If the panel has {m}, "
            f"find its channel among the file(s)' channels{listed} and add to {where}:\n{self.yaml()}"
        )


def missing_markers_text(missing: Sequence[MissingMarker], sep: str = "\n") -> str:
    """The reports of the missing markers, the file(s)' channel list once at the end (when a
    marker has no suggestion)."""
    text = [m.message(list_channels=False) for m in missing]
    channels = list(dict.fromkeys(c for m in missing if not m.closest for c in m.channels))
    if channels:
        text.append(f"channels of the file(s) ($PnN [$PnS]): {', '.join(channels)}")
    return sep.join(text)


@dataclass
class MarkerTable:
    """``resolved[file][marker]`` = ``$PnN`` or None (missing); ``ambiguous[file][marker]`` = why gating
    fails the file (the channel's ``$PnN`` is shared)."""

    files: list[str]
    markers: list[str]
    resolved: dict[str, dict[str, str | None]] = field(default_factory=dict)
    labels: dict[str, list[str]] = field(default_factory=dict)  # file -> "PnN [PnS]" labels
    pairs: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # file -> ($PnN, $PnS)
    #: file -> marker -> why gating fails it (its channel's $PnN is shared by several channels)
    ambiguous: dict[str, dict[str, str]] = field(default_factory=dict)


def _template_markers(template) -> list[str]:

    return [m for m in dict.fromkeys(template.markers() + template.median_markers())]


def populations_needing(template, marker: str) -> list[str]:
    """Populations whose gate uses ``marker`` (not as an optional marker) and their descendants."""
    from cytopipe.gating.engine import _all_dims

    direct = []
    for pop in template:
        optional = set(getattr(pop.gate, "optional", ()))
        names = {
            n
            for d in _all_dims(pop.gate)
            for n in ((d.ratio.numerator, d.ratio.denominator) if d.ratio else (d.name,))
        }
        if marker in names and marker not in optional:
            direct.append(pop.name)
    out = list(direct)
    for name in direct:
        out += [d for d in template.descendants(name) if d not in out]
    # boolean populations of a missing one (an `or` only when every operand is missing: the engine
    # gates it as the union of the measured ones), and their descendants
    for pop in template:
        if pop.name in out:
            continue
        operands = pop.gate.union_of if isinstance(pop.gate, BooleanGate) else ()
        if operands:
            if pop.parent in out or all(o in out for o in operands):
                out.append(pop.name)
        elif any(d in out for d in pop.depends_on):
            out.append(pop.name)
    return [p.name for p in template if p.name in out]


def marker_table(template, channel_tables: Mapping[str, pd.DataFrame], mapping=None) -> MarkerTable:
    from cytopipe.gating._adapters import is_scatter_or_time, resolve_markers

    markers = _template_markers(template)
    panel = {**template.panel, **(mapping or {})}
    table = MarkerTable(files=list(channel_tables), markers=markers)
    for f, ch in channel_tables.items():
        row: dict[str, str | None] = {}
        pnn = [str(v) for v in ch["pnn"]]
        for m in markers:
            if m in pnn and m not in panel:
                row[m] = m
                continue
            try:
                row[m] = resolve_markers(ch, [m], mapping=panel, file=f)[m]
            except PanelError as exc:
                if "no channel carries marker" not in exc.message and not is_scatter_or_time(m):
                    raise
                row[m] = None
        table.resolved[f] = row
        table.ambiguous[f] = {
            m: _twin_message(pnn, channel, m)
            for m, channel in row.items()
            if channel and pnn.count(channel) > 1
        }
        table.pairs[f] = [(str(n), "" if pd.isna(s) else str(s)) for n, s in zip(ch["pnn"], ch["pns"])]
        table.labels[f] = [f"{n} [{s}]" if s.strip() else n for n, s in table.pairs[f]]
    return table


def _twin_message(pnn: list[str], channel: str, marker: str) -> str:
    """The engine's PanelError for a marker on a ``$PnN`` several channels share."""
    twins = [i + 1 for i, n in enumerate(pnn) if n == channel]
    return (
        f"channel name {channel!r} is ambiguous: parameters {twins} of the file all have this $PnN, "
        f"so which one carries {marker!r} cannot be told; correct the file's $PnN keywords (each "
        "channel's name must be unique) and run again"
    )


#: channels that carry no stain (normalised $PnN): never suggested for a marker
_NOT_STAINS = {
    "time",
    "originalid",
    "eventlength",
    "celllength",
    "beaddist",
    "center",
    "offset",
    "width",
    "residual",
}


def _suggestions(marker: str, table: MarkerTable) -> tuple[list[str], list[str]]:
    """(channels whose label names ``marker``, unused fluorescence channels with no marker in
    their label) as ``"PnN [PnS]"``. Never a channel another marker of the template resolved to,
    nor one whose label names another marker: a string-similar label is another marker (CD14 is
    not CD4, CD57 not CD56, the barcode BC1 not PD-1), so similarity alone suggests nothing."""
    from cytopipe.gating._adapters import is_scatter_or_time
    from cytopipe.panel import label_names_marker, normalize

    if is_scatter_or_time(marker):  # found by $PnN; no stain label can be scatter or time
        return _scatter_suggestions(marker, table), []
    used = {v for f in table.files for v in table.resolved[f].values() if v}
    named: list[str] = []
    unlabelled: list[str] = []
    for f in table.files:
        for (pnn, pns), label in zip(table.pairs[f], table.labels[f]):
            if pnn in used or is_scatter_or_time(pnn) or normalize(pnn) in _NOT_STAINS:
                continue
            names = label_names_marker(pns, marker)
            if names is True and label not in named:
                named.append(label)
            elif names is None and label not in unlabelled:
                unlabelled.append(label)
    return named, unlabelled


def _scatter_suggestions(marker: str, table: MarkerTable) -> list[str]:
    """Channels named like a scatter channel but without its -A/-H/-W suffix (a FACSCanto export's
    ``FSC`` and ``SSC`` for ``FSC-A`` / ``SSC-A``): scatter is found by ``$PnN``, so a name the
    template does not spell is suggested by its stem, never by a stain label."""
    from cytopipe.panel import _stem, normalize

    stem = normalize(_stem(marker))
    used = {v for f in table.files for v in table.resolved[f].values() if v}
    found: list[str] = []
    for f in table.files:
        for (pnn, _), label in zip(table.pairs[f], table.labels[f]):
            # the bare stem only: FSC-A is the area, never a suggestion for FSC-H
            if normalize(pnn) == stem and pnn not in used and label not in found:
                found.append(label)
    return found


def missing_everywhere(template, table: MarkerTable) -> list[MissingMarker]:
    out = []
    for m in table.markers:
        if table.files and all(table.resolved[f][m] is None for f in table.files):
            pops = populations_needing(template, m)
            if not pops:  # only a median marker: its medians are simply NaN
                continue
            source = str(template.source) if getattr(template, "source", None) else ""
            named, unlabelled = _suggestions(m, table)
            channels = list(dict.fromkeys(label for f in table.files for label in table.labels[f]))
            out.append(MissingMarker(m, pops, named, len(table.files), source, unlabelled, channels))
    return out


def check_study_markers(
    template, channel_tables: Mapping[str, pd.DataFrame], policy: str = "stop", mapping=None
):
    """Raise ONE PanelError naming every marker absent from every file (``policy='stop'``); with
    ``'skip'`` return the list (their populations will be "not measured")."""
    if policy not in MISSING_POLICIES:
        raise PanelError(f"missing_markers must be one of {list(MISSING_POLICIES)}, got {policy!r}")
    missing = missing_everywhere(template, marker_table(template, channel_tables, mapping))
    if missing and policy == "stop":
        text = missing_markers_text(missing)
        # no `marker=` context: each marker's own line names it (the prefix read "marker 'CD4, CD25,
        # ...': marker 'CD4' is in none ...", one marker name holding commas, then each again)
        raise PanelError(
            f"{text}\nNothing was gated. To gate everything else and report these populations as "
            "'not measured', use --missing-markers skip (or `missing_markers: skip` in the workflow)."
        )
    return missing


def channel_tables(files: Sequence[Path]) -> dict[str, pd.DataFrame]:
    from cytopipe.fcs import read_fcs_header

    return {str(f): read_fcs_header(f).channels for f in files}


# --------------------------------------------------------------------------------------------
# cytopipe template check
# --------------------------------------------------------------------------------------------
def describe_gate(pop, template) -> tuple[str, str]:
    """(gate source, fallback) of a population, in words."""
    g = pop.gate
    if getattr(g, "type", "") == "boolean":
        return "boolean", "-"
    if not g.data_driven:
        return "fixed", "-"
    items = g.fit_items()
    sources, falls = [], []
    for _, f in items:
        if f.method == "reference":
            src = (
                "control (FMO)" if f.options.get("control") else f"reference ({f.options.get('population')})"
            )
        else:
            src = f"fitted ({f.method})"
        sources.append(src)
        fb = [f"pooled {f.pool} estimate"]
        if (
            f.method in ("auto", "shoulder", "tail", "valley", "diagonal", "reference")
            and "search" not in f.options
        ):
            fb.append("landmark fallback")
        if f.default is not None:
            fb.append(f"default {f.describe(f.default)}")
        falls.append(" > ".join(fb))
    return "; ".join(dict.fromkeys(sources)), "; ".join(dict.fromkeys(falls))


def file_problems(
    template,
    table: MarkerTable,
    without_spillover: Collection[str] = (),
    data_errors: Mapping[str, str] | None = None,
    n_events: Mapping[str, int] | None = None,
    fit_events: Mapping[str, Mapping[str, tuple[int, int]]] | None = None,
) -> dict[str, list[str]]:
    """Per file, what gating it would report: a DATA segment it cannot read (truncated: the
    header's ``data_error``), a refusal (a ``compensation: file`` template and a file without a
    spillover matrix), the populations not measured (as ``cytopipe gate``) and gates on all
    events it has too few events for (:func:`too_few_events`)."""
    out: dict[str, list[str]] = {}
    small = too_few_events(template, n_events or {}, fit_events)
    for f in table.files:
        refusal = _refusal(template, f, without_spillover)
        unmeasured = _not_measured(template, table, f)
        data_error = (data_errors or {}).get(f)
        out[f] = (
            ([data_error] if data_error else [])
            + ([refusal] if refusal else [])
            + list(dict.fromkeys(table.ambiguous.get(f, {}).values()))
            + ([f"not measured: {', '.join(unmeasured)}"] if unmeasured else [])
            + small.get(f, [])
        )
    return out


def _root_fitters(pop) -> list:
    """The fits of a gate on all events that nothing replaces when they fail (no ``default``)."""
    if pop.parent != "root":
        return []
    return [f for _, f in getattr(pop.gate, "fit_items", list)() if f.default is None]


def too_few_events(
    template,
    n_events: Mapping[str, int],
    fit_events: Mapping[str, Mapping[str, tuple[int, int]]] | None = None,
) -> dict[str, list[str]]:
    """Per file, the gates on all events (parent ``root``) it has too few events to fit
    (``min_events``), when no file of the set has enough either (so no pooled estimate) and the
    gate has no typed ``default``: ``cytopipe gate`` leaves that population, and every one under
    it, empty (flagged), or fails the file when it has enough events but its fit reads too few
    (saturated events are left out of fits). ``fit_events``: file -> population -> (events its
    fit reads, the ``min_events`` it needs), for the files whose events were read
    (:func:`fit_event_counts`); a file not in it is counted by its header."""
    out: dict[str, list[str]] = {f: [] for f in n_events}
    for pop in template:
        fitters = _root_fitters(pop)
        need = max((f.bounds.min_events for f in fitters), default=0)
        if not need or not n_events:
            continue
        reads = {f: (fit_events or {}).get(f, {}).get(pop.name, (n, need)) for f, n in n_events.items()}
        if any(n >= need and reads[f][0] >= reads[f][1] for f, n in n_events.items()):
            continue  # a file fits it: the others fall back on its pooled estimate
        for f, n in n_events.items():
            got, wanted = reads[f]
            if n < need:
                out[f].append(
                    f"the file has {n} events; gate {pop.name!r} (on all events) needs at least {need} "
                    f"(`min_events`) to be fitted, and no file checked has that many (so there is no "
                    f"pooled estimate either): "
                    f"`cytopipe gate` leaves {pop.name} and every population under it empty. For files "
                    f"this small, lower `min_events` in your copy of the template"
                )
            else:
                out[f].append(
                    f"the file has {n} events, but the fit of gate {pop.name!r} (on all events) reads "
                    f"only {got} of them (events saturated at a detector's maximum on the gate's "
                    f"channels are left out of fits) and needs at least {wanted} (`min_events`); no "
                    f"file checked has that many (so there is no pooled estimate either): "
                    f"`cytopipe gate` fails this file. Lower `min_events` in your copy of the template, "
                    f"or give the gate a `default:`"
                )
    return out


def fit_event_counts(
    template, paths: Sequence[str], n_events: Mapping[str, int]
) -> dict[str, dict[str, tuple[int, int]]]:
    """Per file, per gate on all events: (events its fit reads, the ``min_events`` it needs) of its
    fit that falls shortest, counted as the engine counts them (:meth:`Engine.fit_event_count`:
    its seeded subsample less the events saturated on the gate's channels). Events are read only
    where the header cannot decide: for a gate whose header counts reach its ``min_events``, file
    after file until one fits it (its pooled estimate serves the others). A file that cannot be
    read is left to its header count (and its own problem)."""
    out: dict[str, dict[str, tuple[int, int]]] = {}
    pending = {}  # population -> (its fitters, its min_events): no file read fits it yet
    for pop in template:
        fitters = _root_fitters(pop)
        need = max((f.bounds.min_events for f in fitters), default=0)
        if need:
            pending[pop.name] = (fitters, need)
    for path in paths:  # one file's events in memory at a time
        todo = [name for name, (_, need) in pending.items() if n_events.get(path, 0) >= need]
        engine = _engine_of(template, path) if todo else None
        if engine is None:
            continue  # too few events by its header already, or unreadable: its header count
        for name in todo:
            fitters = pending[name][0]
            try:  # (a `reference` fit reads another population or a control: its header count)
                counts = [(engine.fit_event_count(f) if f.method != "reference" else n_events[path],
                           f.bounds.min_events) for f in fitters]  # fmt: skip
            except (KeyError, ValueError):  # a marker the file lacks: reported as not measured
                continue
            out.setdefault(path, {})[name] = min(counts, key=lambda c: c[0] - c[1])
            if all(got >= wanted for got, wanted in counts):
                del pending[name]  # its pooled estimate serves the other files
        if not pending:
            break
    return out


def _engine_of(template, path: str):
    """The gating engine of one file (its events read as ``cytopipe gate`` reads them), or None."""
    from cytopipe.errors import CytopipeError
    from cytopipe.gating.engine import Engine
    from cytopipe.gating.loading import read_sample

    try:
        sample = read_sample(path, template)
        return Engine(events=sample.events, channels=sample.channels, template=template,
                      spillover=getattr(sample, "spillover", None), file=path)  # fmt: skip
    except CytopipeError:
        return None


def _refusal(template, file: str, without_spillover: Collection[str]) -> str:
    """Why ``cytopipe gate`` would refuse the file ('' when it would not): gate's own message."""
    from cytopipe.gating.engine import needs_file_spillover, no_spillover_message

    return (
        no_spillover_message(template) if file in without_spillover and needs_file_spillover(template) else ""
    )


def _not_measured(template, table: MarkerTable, file: str) -> dict[str, str]:
    """The populations ``cytopipe gate`` reports "not measured" in the file (name -> reason)."""
    from cytopipe.gating.engine import not_measured_populations

    missing = {m for m, channel in table.resolved[file].items() if channel is None}
    return not_measured_populations(template, missing)


def template_check_text(
    template,
    table: MarkerTable,
    without_spillover: Collection[str] = (),
    data_errors: Mapping[str, str] | None = None,
    unusable: Mapping[str, str] | None = None,
    n_events: Mapping[str, int] | None = None,
    fit_events: Mapping[str, Mapping[str, tuple[int, int]]] | None = None,
) -> str:
    """The check's report: per file and population, markers -> channels, gate source, fallback and
    NOT MEASURED (as ``cytopipe gate`` would report it); per file, a DATA segment that cannot be
    read or a refusal by ``cytopipe gate``; then every marker absent from all files, with the
    ``panel:`` YAML to add; last, a summary. ``unusable``: files left out of ``table`` because
    gating would fail them outright (not FCS, a ``panel:`` channel they lack): file -> why."""
    lines = []
    for f, why in (unusable or {}).items():
        lines.append(f"file {f}")
        lines.append(f"  PROBLEM: `cytopipe gate` and `cytopipe run` would fail this file: {why}")
    w = max(len(p.name) for p in template)
    small = too_few_events(template, n_events or {}, fit_events)
    for f in table.files:
        lines.append(f"file {f}")
        if data_error := (data_errors or {}).get(f):  # the headers read, the events would not
            lines.append(f"  PROBLEM: `cytopipe gate` and `cytopipe run` would fail this file: {data_error}")
        if refusal := _refusal(template, f, without_spillover):
            lines.append(f"  PROBLEM: `cytopipe gate` would refuse this file: {refusal}")
        for why in dict.fromkeys(table.ambiguous.get(f, {}).values()):
            lines.append(f"  PROBLEM: `cytopipe gate` and `cytopipe run` would fail this file: {why}")
        for why in small.get(f, []):
            lines.append(f"  PROBLEM: {why}")
        unmeasured = _not_measured(template, table, f)
        for pop in template:
            res = []
            for m in pop.markers:
                ch = table.resolved[f].get(m)
                twin = " (AMBIGUOUS: a shared $PnN)" if m in table.ambiguous.get(f, {}) else ""
                res.append(f"{m} -> {ch}{twin}" if ch else f"{m} -> MISSING")
            source, fallback = describe_gate(pop, template)
            status = "  NOT MEASURED" if pop.name in unmeasured else ""
            lines.append(
                f"  {pop.name:<{w}}  {', '.join(res) or '(boolean)'}  | {source} | fallback: {fallback}{status}"
            )
    missing = missing_everywhere(template, table)
    if missing:
        lines.append("")
        lines.append(missing_markers_text(missing, sep="\n\n"))
    problems = file_problems(template, table, without_spillover, data_errors, n_events, fit_events)
    bad = [f for f, found in problems.items() if found]
    bad += list(unusable or {})
    n_files = len(table.files) + len(unusable or {})
    lines.append("")
    if bad or missing:
        lines.append(
            f"{len(bad)} of {n_files} file(s) with problems (listed above); "
            f"{len(missing)} marker(s) in no file; exit code 3"
        )
    else:
        lines.append(f"{n_files} file(s): every population can be gated")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Check a gating template against FCS files (headers; events only to count what a fit on all "
        "events reads where the header cannot tell): per file and population, the "
        "markers' channels, the gate's source and fallback, populations NOT MEASURED and files "
        "`cytopipe gate` would refuse or fail (e.g. truncated). Exit code 0: every population can be gated in every file; 3: "
        "the check completed and found problems (listed; a file that cannot be read is one); 2: the "
        "template cannot be read."
    )
    parser.add_argument("action", choices=["check"], help="`check`: resolve a template against files")
    parser.add_argument(
        "files",
        nargs="+",
        type=Path,
        help="FCS files (headers are read; events only where min_events needs them)",
    )
    parser.add_argument("--template", required=True, type=Path, help="gating template (.yaml)")


def run(args) -> int:
    from cytopipe.errors import EXIT_FAILURES, EXIT_OK, CytopipeError
    from cytopipe.fcs import read_fcs_header
    from cytopipe.gating import load_template

    template = load_template(args.template)
    headers, unusable = {}, {}
    for f in map(str, args.files):
        try:  # a file `cytopipe gate` would fail outright is a problem of that file, not of the check
            header = read_fcs_header(f)
            marker_table(template, {f: header.channels})  # e.g. a `panel:` channel it lacks
        except CytopipeError as exc:
            unusable[f] = str(exc)
            continue
        headers[f] = header
    table = marker_table(template, {f: h.channels for f, h in headers.items()})
    without_spillover = [f for f, h in headers.items() if h.spillover is None]
    data_errors = {f: h.data_error for f, h in headers.items() if h.data_error}  # truncated, ...
    n_events = {f: h.n_events for f, h in headers.items()}
    readable = [f for f in headers if f not in data_errors]
    fit_events = fit_event_counts(template, readable, n_events)  # events read only where needed
    print(
        template_check_text(template, table, without_spillover, data_errors, unusable, n_events, fit_events)
    )
    problems = file_problems(template, table, without_spillover, data_errors, n_events, fit_events)
    failed = bool(unusable) or bool(missing_everywhere(template, table)) or any(problems.values())
    return EXIT_FAILURES if failed else EXIT_OK
