"""FlowJo 10 workspace (``.wsp``) import: one sample's gates as a fixed-gate template.

FlowKit's workspace parser reads the gates, per-channel transforms and compensation; this module
converts its gate objects into cytopipe's model so cytopipe's engine applies them, and reads what
FlowKit does not keep (the counts FlowJo stored, sample groups, file names) straight from the XML.
The FCS files are not needed to read the gates. FlowJo's own transforms (biex, log) are evaluated by
FlowKit's implementations of them; the Gating-ML ones map onto cytopipe's transforms.

Identity: a population *is* its full path (``/Lymphocytes/CD4+/Q2: CD107a+, IL2+/some_child_gate``,
kept as :attr:`Population.path` and written as ``population_path``). Display names are the gate name
when it is unique and otherwise the shortest unique tail of the path (``CD4+/IFNg+``); two
populations with the same full path are an error naming both. Gate names FlowKit cannot hold
(``.``, ``..``) are renamed for FlowKit only and restored here, so those workspaces import too.
Every FlowKit failure becomes a :class:`~cytopipe.errors.TemplateError` naming the workspace, the
sample, its sample groups and the gate.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np

from cytopipe.errors import TemplateError
from cytopipe.gating.gates import BooleanGate, Dim, EllipsoidGate, Operand, PolygonGate, RectangleGate
from cytopipe.gating.template import ROOT, Matrix, Population, Template

logger = logging.getLogger(__name__)

NODE_TAGS = ("Population", "AndNode", "OrNode", "NotNode")
# anytree (FlowKit's gate tree) cannot hold these names: FlowKit sees a placeholder instead
_UNSAFE_NAMES = {".": "__cytopipe_dot__", "..": "__cytopipe_dotdot__"}


@dataclass
class WorkspaceSample:
    """One sample of a FlowJo workspace, as stored in its XML."""

    name: str  # SampleNode name (FlowKit's sample id, usually the FCS file name)
    sample_id: str  # FlowJo's numeric sampleID
    uri: str
    keywords: dict[str, str]
    counts: dict[str, int]  # population path ("root" for the sample) -> count FlowJo stored (-1: none)
    node_types: dict[str, str]  # population path -> Population | AndNode | OrNode | NotNode
    groups: list[str] = field(default_factory=list)

    @property
    def file_names(self) -> list[str]:
        """Names the FCS file may have: the sample name, the DataSet URI's file name and $FIL."""
        names = [self.name]
        if self.uri:
            names.append(Path(unquote(urlparse(self.uri).path)).name)
        if self.keywords.get("$FIL"):
            names.append(self.keywords["$FIL"])
        return list(dict.fromkeys(n for n in names if n))


class FlowJoWorkspace:
    """A FlowJo 10 workspace: its samples, groups and stored counts, and each sample's gates as a
    :class:`Template` (:meth:`template`)."""

    def __init__(self, path: str | Path):
        from lxml import etree

        self.path = Path(path)
        if not self.path.is_file():
            raise TemplateError("FlowJo workspace not found", file=self.path)
        try:
            root = etree.parse(str(self.path), etree.XMLParser(huge_tree=True)).getroot()
        except (OSError, etree.XMLSyntaxError) as exc:
            raise TemplateError(f"cannot parse the workspace XML: {exc}", file=self.path) from None
        if etree.QName(root).localname != "Workspace" or root.find("SampleList") is None:
            raise TemplateError("not a FlowJo workspace (no <Workspace> with a <SampleList>)", file=self.path)
        version = root.get("version", "")
        if not version.split(".")[0].isdigit() or int(version.split(".")[0]) < 20:
            raise TemplateError(
                f"this is a FlowJo {root.get('flowJoVersion') or 'v9 or older'} workspace (XML version "
                f"{version or '?'}); only FlowJo 10 workspaces (.wsp, version 20) are imported. Not imported: "
                "gates, transforms, compensation and counts. Open it in FlowJo 10 and save it as .wsp.",
                file=self.path,
            )
        self.renamed: dict[str, str] = {}
        self.samples: list[WorkspaceSample] = []
        self.groups: dict[str, list[str]] = {}
        by_id: dict[str, WorkspaceSample] = {}
        for s in root.find("SampleList").findall("Sample"):
            node = s.find("SampleNode")
            if node is None:
                continue
            ds = s.find("DataSet")
            kw = s.find("Keywords")
            keywords = {k.get("name"): k.get("value", "") for k in kw} if kw is not None else {}
            counts: dict[str, int] = {"root": _int(node.get("count"))}
            types: dict[str, str] = {}
            self._walk(node, node, (), (), counts, types)
            ws = WorkspaceSample(
                name=node.get("name", ""),
                sample_id=node.get("sampleID", ""),
                uri=ds.get("uri", "") if ds is not None else "",
                keywords=keywords,
                counts=counts,
                node_types=types,
            )
            self.samples.append(ws)
            by_id[ws.sample_id] = ws
        groups_el = root.find("Groups")
        for g in groups_el.findall("GroupNode") if groups_el is not None else []:
            refs = [r.get("sampleID") for r in g.iter("SampleRef")]
            members = [by_id[r].name for r in refs if r in by_id]
            self.groups[g.get("name", "")] = members
            for r in refs:
                if r in by_id:
                    by_id[r].groups.append(g.get("name", ""))
        self._xml = etree.tostring(root) if self.renamed else None
        self._fk = None

    def _walk(self, node, el, path: tuple[str, ...], fk_path: tuple[str, ...], counts, types) -> None:
        """Stored counts by full path; renames gates FlowKit cannot hold; refuses duplicate paths."""
        sub = el.find("Subpopulations")
        if sub is None:
            return
        for child in sub:
            if not isinstance(child.tag, str) or child.tag not in NODE_TAGS:
                continue
            name = child.get("name", "")
            full = path + (name,)
            key = "/" + "/".join(full)
            if key in counts:
                raise TemplateError(
                    f"two populations have the same full path {key!r} (a {types[key]} and a {child.tag}); "
                    "rename one of them in FlowJo so each population has its own path",
                    file=self.path,
                    sample=node.get("name"),
                    gate=key,
                )
            counts[key] = _int(child.get("count"))
            types[key] = child.tag
            fk_name = name
            if name in _UNSAFE_NAMES:
                fk_name = _UNSAFE_NAMES[name]
                self.renamed[fk_name] = name
                child.set("name", fk_name)
                self._fix_dependents(node, fk_path + (name,), fk_name)
            self._walk(node, child, full, fk_path + (fk_name,), counts, types)

    @staticmethod
    def _fix_dependents(node, full: tuple[str, ...], placeholder: str) -> None:
        """Boolean nodes refer to populations by '/'-joined paths: follow a renamed gate."""
        old = "/".join(full)
        new = "/".join((*full[:-1], placeholder))
        for dep in node.iter("Dependent"):
            name = dep.get("name", "")
            if name == old or name.startswith(old + "/"):
                dep.set("name", new + name[len(old) :])

    # ---- lookup ------------------------------------------------------------------------------
    def sample(self, name: str | None = None, group: str | None = None) -> WorkspaceSample:
        """A sample by name (default: the first by name of ``group``, or of the workspace)."""
        pool = self.samples
        if group is not None:
            if group not in self.groups:
                raise TemplateError(
                    f"no sample group {group!r} in the workspace; groups are {sorted(self.groups)}",
                    file=self.path,
                )
            pool = [s for s in self.samples if s.name in self.groups[group]]
        if not pool:
            raise TemplateError(
                "the workspace lists no samples" + (f" in group {group!r}" if group else ""), file=self.path
            )
        if name is None:
            return min(pool, key=lambda s: s.name)
        for s in pool:
            if s.name == name:
                return s
        raise TemplateError(
            f"no sample {name!r} in the workspace; samples are {[s.name for s in pool]}", file=self.path
        )

    def sample_for_file(self, fcs: str | Path) -> WorkspaceSample | None:
        """The workspace sample an FCS file belongs to (by the sample name, the file name of its
        DataSet URI or ``$FIL``), or None when no sample names it. Several samples naming the same
        file name: the one whose URI is that very file, else the first."""
        fcs = Path(fcs)
        hits = [s for s in self.samples if fcs.name in s.file_names]
        if len(hits) > 1:
            exact = [s for s in hits if s.uri and Path(unquote(urlparse(s.uri).path)) == fcs.resolve()]
            hits = exact or hits
        return hits[0] if hits else None

    def _where(self, s: WorkspaceSample) -> str:
        groups = [g for g in s.groups if g != "All Samples"] or s.groups
        return f"sample group {', '.join(map(repr, groups)) or '(none)'}"

    def _flowkit(self):
        if self._fk is None:
            import flowkit as fk

            source = io.BytesIO(self._xml) if self._xml is not None else str(self.path)
            try:
                self._fk = fk.Workspace(source, load_missing_file_data=True)
            except Exception as exc:  # FlowKit raises many types; every one is a workspace problem
                raise TemplateError(
                    f"FlowKit cannot read the workspace: {type(exc).__name__}: {exc}", file=self.path
                ) from None
        return self._fk

    # ---- gates -------------------------------------------------------------------------------
    def template(self, sample: str | None = None, group: str | None = None) -> Template:
        """The gates, transforms and compensation of one sample as a fixed-gate template."""
        s = self.sample(sample, group)
        where = self._where(s)
        path = self.path
        ws = self._flowkit()
        try:
            gs = ws.get_gating_strategy(s.name)
            ids = gs.get_gate_ids()  # (name, path) in hierarchy order
        except Exception as exc:
            raise TemplateError(
                f"{where}: FlowKit cannot build the gating: {type(exc).__name__}: {exc}",
                file=path,
                sample=s.name,
            ) from None

        def real(name: str) -> str:
            return self.renamed.get(name, name)

        def full_path(name: str, gate_path) -> str:
            return "/" + "/".join(real(p) for p in (*gate_path[1:], name))

        try:
            transforms = {tid: _transform_spec(t, tid, path) for tid, t in gs.transformations.items()}
        except TemplateError as exc:
            raise TemplateError(f"{where}: {exc.message}", file=path, sample=s.name) from None
        matrices = {
            mid: Matrix(list(m.fluorochromes), list(m.detectors), np.asarray(m.matrix, dtype=np.float64))
            for mid, m in gs.comp_matrices.items()
        }
        paths = [full_path(n, p) for n, p in ids]
        display = display_names(paths)
        key_of = {(n, tuple(p)): display[fp] for (n, p), fp in zip(ids, paths)}

        pops: dict[str, Population] = {}
        for (name, gate_path), fp in zip(ids, paths):
            try:
                g = gs.get_gate(name, gate_path)
                gate = _convert(g, matrices, transforms, key_of, path)
            except TemplateError as exc:
                raise TemplateError(f"{where}: {exc.message}", file=path, sample=s.name, gate=fp) from None
            except Exception as exc:
                raise TemplateError(
                    f"{where}: FlowKit cannot convert this gate: {type(exc).__name__}: {exc}",
                    file=path,
                    sample=s.name,
                    gate=fp,
                ) from None
            parent = ROOT if gate_path[-1] == "root" else key_of[(gate_path[-1], tuple(gate_path[:-1]))]
            pops[display[fp]] = Population(display[fp], parent, gate, path=fp)
        return Template(
            name=f"{path.stem} ({s.name})",
            populations=pops,
            transforms=transforms,
            compensation="none",
            matrices=matrices,
            source=path,
            preprocess=True,  # FlowJo reads files preprocessed ($PnE, $PnG), as FlowKit
        )


def display_names(paths: list[str]) -> dict[str, str]:
    """Full path -> short unique display name: the last path element when no other population has
    it, else the shortest unique tail (``CD4+/IFNg+``). Duplicate full paths are an error."""
    parts = {p: p.strip("/").split("/") for p in paths}
    if len(set(paths)) != len(paths):
        dup = next(p for p in paths if paths.count(p) > 1)
        raise TemplateError(f"two populations have the same full path {dup!r}", gate=dup)
    depth = dict.fromkeys(paths, 1)
    while True:
        names = {p: "/".join(parts[p][-depth[p] :]) for p in paths}
        seen: dict[str, list[str]] = {}
        for p, n in names.items():
            seen.setdefault(n, []).append(p)
        clashes = [ps for ps in seen.values() if len(ps) > 1]
        if not clashes:
            return names
        grew = False
        for ps in clashes:
            for p in ps:
                if depth[p] < len(parts[p]):
                    depth[p] += 1
                    grew = True
        if not grew:  # a full path equals another's tail, e.g. a gate literally named "A/B"
            a, b = clashes[0][:2]
            raise TemplateError(
                f"populations {a!r} and {b!r} cannot be told apart by name; rename one of them", gate=a
            )


def _convert(g, matrices, transforms, key_of, path: Path):
    """A FlowKit gate (from a workspace) as a cytopipe gate."""

    def dim(d) -> Dim:
        comp = d.compensation_ref
        if comp in (None, "uncompensated"):
            comp = None
        elif comp != "FCS" and comp not in matrices:
            raise TemplateError(f"compensation {comp!r} is not defined in the workspace")
        xform = d.transformation_ref if d.transformation_ref in transforms else None
        return Dim(d.id, comp, xform)

    kind = type(g).__name__
    if getattr(g, "use_complement", False):
        raise TemplateError(
            f"the {kind} keeps the events outside it (FlowJo 'eventsInside=0'), which cytopipe does not "
            "import; redraw it as a gate around the events to keep, or as a NOT gate"
        )
    if kind == "RectangleGate":
        return RectangleGate(
            [dim(d) for d in g.dimensions], [d.min for d in g.dimensions], [d.max for d in g.dimensions]
        )
    if kind == "PolygonGate":
        return PolygonGate([dim(d) for d in g.dimensions], g.vertices)
    if kind == "EllipsoidGate":
        return EllipsoidGate(
            [dim(d) for d in g.dimensions], g.coordinates, g.covariance_matrix, g.distance_square
        )
    if kind == "BooleanGate":
        operands = []
        for r in g.gate_refs:
            key = (r["ref"], tuple(r["path"]))
            if key not in key_of:
                raise TemplateError(
                    f"the boolean gate refers to {'/'.join(key[1][1:] + (key[0],))!r}, not in the workspace"
                )
            operands.append(Operand(key_of[key], bool(r.get("complement"))))
        return BooleanGate(op=g.type, operands=tuple(operands))
    raise TemplateError(f"unsupported FlowJo gate type {kind}")


def read_flowjo_workspace(path: str | Path, sample: str | None = None, group: str | None = None) -> Template:
    """The gates of ``sample`` (a sample name as FlowJo lists it, usually the FCS file name; default:
    the first sample of ``group``, or of the workspace) in a FlowJo 10 workspace, as a template.

    Without ``sample``, a workspace of several samples gives the first one's gates, with a warning
    naming it: FlowJo samples often carry gates of their own (custom gates, or gates moved by hand),
    which the other files would then not get (``cytopipe gate`` and ``cytopipe run`` gate each file
    of the workspace with its own sample's gates)."""
    ws = FlowJoWorkspace(path)
    template = ws.template(sample, group)
    pool = ws.groups.get(group, []) if group is not None else [s.name for s in ws.samples]
    if sample is None and len(pool) > 1:
        logger.warning(
            "FlowJo workspace '%s' holds %d samples; its template is the gates of sample '%s' (the first "
            "by name), used for every file: a sample with gates of its own (custom or moved gates) is "
            "not gated as in FlowJo. `cytopipe gate FILES --template %s` (and `cytopipe run` with it) "
            "gates each file of the workspace with its own sample's gates",
            ws.path,
            len(pool),
            ws.sample(None, group).name,
            ws.path.name,
        )
    return template


def _int(value) -> int:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return -1


def _transform_spec(t, tid: str, path: Path) -> dict:
    """A FlowKit transform from the workspace as a template transform dict."""
    from cytopipe.errors import TransformError
    from cytopipe.transforms import from_flowkit

    if type(t).__name__ == "WSPLogTransform":
        return {"type": "flowjo_log", "offset": float(t.offset), "decades": float(t.decades)}
    try:
        return from_flowkit(t).to_dict()
    except TransformError as exc:
        raise TemplateError(f"transform {tid!r}: {exc.message}", file=path) from None
