"""Cytobank Gating-ML exports: tailored gates, population names and population definitions.

A Cytobank export is Gating-ML 2.0 with Cytobank's own ``custom_info``:

* every gate carries ``<cytobank><name>CD3+</name><gate_id>5</gate_id>...``; a gate *tailored* to
  one FCS file is a further element with the same ``gate_id`` and that file's
  ``<fcs_file_filename>`` (the experiment-wide gate has it empty);
* populations ("gate sets") are ``BooleanGate`` ``and`` elements over the experiment-wide gates on
  the way from the root (a single-gate population is written ``and(g, g)``), named by their
  ``<cytobank><name>``; the gates themselves carry no ``parent_id``.

:func:`read_cytobank` turns that into cytopipe's hierarchy: one population per gate set, named by
Cytobank's population name (never the XML id), whose parent is the largest gate set it contains;
its gate is the one gate it adds (each further gate becomes a population named after that gate).
For a given FCS file every gate that was tailored to it is replaced by its tailored copy; a gate
tailored to other files but not to this one keeps the experiment-wide copy and is warned about.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from cytopipe.errors import GatingMLError
from cytopipe.gating.gates import BooleanGate, Operand
from cytopipe.gating.template import ROOT, Population, Template

logger = logging.getLogger(__name__)


@dataclass
class _Gate:
    xml_id: str
    kind: str
    name: str
    gate_id: str
    file: str  # fcs_file_filename ("" = experiment-wide)
    el: object


def is_cytobank(root) -> bool:
    """Whether a parsed Gating-ML document was written by Cytobank."""
    return any(True for _ in root.iter("cytobank"))


def _info(el, key: str) -> str:
    cb = el.find("{http://www.isac-net.org/std/Gating-ML/v2.0/datatypes}custom_info/cytobank")
    if cb is None:
        return ""
    node = cb.find(key)
    return (node.text or "").strip() if node is not None else ""


def tailored_files(root) -> list[str]:
    """The FCS file names a Cytobank document has tailored gates for."""
    from cytopipe.gating.gatingml import GATE_KINDS, G

    files = set()
    for el in root:
        if isinstance(el.tag, str) and el.tag.replace(G, "") in GATE_KINDS and _info(el, "fcs_file_filename"):
            files.add(_info(el, "fcs_file_filename"))
    return sorted(files)


def read_cytobank(root, path: Path, fcs_file: str | None = None) -> Template:
    """A Cytobank export as a template for one FCS file (``None``: the experiment-wide gates)."""
    from cytopipe.gating.flowjo import display_names
    from cytopipe.gating.gatingml import GATE_KINDS, G, _attr, _Doc

    doc = _Doc(root)
    gates: list[_Gate] = []
    for el in root:
        if not isinstance(el.tag, str):
            continue
        kind = el.tag.replace(G, "")
        if kind not in GATE_KINDS:
            continue
        xml_id = _attr(el, G, "id", True, kind)
        gates.append(
            _Gate(
                xml_id,
                kind,
                _info(el, "name") or xml_id,
                _info(el, "gate_id"),
                _info(el, "fcs_file_filename"),
                el,
            )
        )
    base = {g.xml_id: g for g in gates if not g.file}
    tailored: dict[str, dict[str, _Gate]] = {}  # gate_id -> file -> tailored copy
    for g in gates:
        if g.file and g.kind != "BooleanGate":
            tailored.setdefault(g.gate_id, {})[g.file] = g

    # geometry of each experiment-wide gate for this file (quadrants: one rectangle per Quadrant id)
    wanted = Path(fcs_file).name if fcs_file else None
    geometry: dict[str, object] = {}
    gate_name: dict[str, str] = {}
    missing: list[str] = []
    for g in base.values():
        if g.kind == "BooleanGate":
            continue
        src = g
        copies = tailored.get(g.gate_id, {}) if g.gate_id else {}
        if copies:
            hit = copies.get(wanted) if wanted else None
            if hit is None and wanted:
                hit = next((c for f, c in copies.items() if f.lower() == wanted.lower()), None)
            if hit is not None:
                src = hit
            else:
                missing.append(
                    f"{g.name!r} (tailored to {len(copies)} other file(s): {', '.join(sorted(copies)[:3])})"
                )
        own = [(i, _bare_channels(gate)) for i, gate in doc.gates(src.el, src.kind, src.xml_id)]
        mine = doc.gates(g.el, g.kind, g.xml_id)  # ids of the experiment-wide element name the gates
        for (bid, _), (_, gate) in zip(mine, own):
            geometry[bid] = gate
            gate_name[bid] = g.name if g.kind != "QuadrantGate" else bid
    if missing:
        who = f"file {wanted!r}" if wanted else "these files (no FCS file named)"
        logger.warning(
            "%s: %s has no tailored copy of gate(s) %s; the experiment-wide gate is used",
            path.name,
            who,
            "; ".join(missing),
        )

    # populations: Cytobank's gate sets (and of experiment-wide gates), named by Cytobank's names
    sets: list[tuple[str, list[str]]] = []
    for g in base.values():
        if g.kind != "BooleanGate":
            continue
        (_, bg), *_ = doc.gates(g.el, g.kind, g.xml_id)
        refs = list(dict.fromkeys(o.population for o in bg.operands))  # root-to-leaf order, no repeats
        if bg.op != "and" or any(o.negate for o in bg.operands) or any(r not in geometry for r in refs):
            logger.warning("%s: population %r is not an 'and' of gates; not imported", path.name, g.name)
            continue
        sets.append((g.name, refs))
    if not sets:  # gates without population definitions: each gate is a population at the root
        sets = [(gate_name[i], [i]) for i in geometry]
    sets.sort(key=lambda s: len(s[1]))  # stable: document order within a depth

    chain: dict[frozenset, str] = {}  # gate set -> path of the population it defines
    entries: list[tuple[str, str | None, object]] = []  # (path, parent path, gate or copied path)
    for name, refs in sets:
        key = frozenset(refs)
        parent_set = max((k for k in chain if k < key), key=len, default=frozenset())
        parent_path = chain.get(parent_set)
        if key in chain:  # the same gates as another population: a copy of it under this name
            entries.append((f"{_parent_of(chain[key]) or ''}/{name}", _parent_of(chain[key]), chain[key]))
            continue
        covered = set(parent_set)
        extra = [r for r in refs if r not in parent_set]
        for i, ref in enumerate(extra):
            covered.add(ref)
            label = name if i == len(extra) - 1 else gate_name[ref]  # gates between: named by the gate
            here = f"{parent_path or ''}/{label}"
            entries.append((here, parent_path, geometry[ref]))
            chain.setdefault(frozenset(covered), here)
            parent_path = here
    display = display_names([p for p, _, _ in entries])
    pops: dict[str, Population] = {}
    for p, parent, gate in entries:
        if isinstance(gate, str):  # a copy of the population at path `gate`
            gate = BooleanGate(op="and", operands=(Operand(display[gate]),))
        pops[display[p]] = Population(display[p], display[parent] if parent else ROOT, gate, path=p)
    if not pops:
        raise GatingMLError("the Cytobank document defines no populations")
    return Template(
        name=f"{path.stem} ({wanted})" if wanted else path.stem,
        populations=pops,
        transforms=doc.transforms,
        compensation="none",
        matrices=doc.matrices,
        source=path,
        preprocess=True,  # Cytobank, as Gating-ML: preprocessed values
    )


def _parent_of(path: str) -> str | None:
    head = path.rsplit("/", 1)[0]
    return head or None


def _bare_channels(gate):
    """Cytobank names channels on a custom compensation ``Comp_<channel>``: gate the channel itself
    (the compensation is in the dimension's compensation-ref)."""
    from dataclasses import replace

    dims = tuple(
        replace(d, name=d.name[len("Comp_") :])
        if d.name.startswith("Comp_") and d.compensation not in (None, "uncompensated") and d.ratio is None
        else d
        for d in gate.dims
    )
    gate.dims = dims
    return gate
