"""``cytopipe gate``: gate FCS files with a template in one process.

::

    cytopipe gate data/*.fcs --template gating/sle_il2_tcell_nk.yaml --out results/
    cytopipe gate --manifest sample_data/manifest.csv --template gating/sle_il2_tcell_nk.yaml --out results/

Writes ``OUT/population_stats.parquet`` (one row per sample and population), plus
``OUT/gate_flags.parquet`` (every fallback of a data-driven gate, with its reason) and
``OUT/gate_fits.parquet`` (each sample's own fits). When the template has data-driven
gates and more than one file is given, gates are pooled across the files (two passes:
fit every file, pool per the template's ``pool:`` levels, then gate).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import pandas as pd

from cytopipe.errors import CytopipeError, GatingError, ManifestError

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "files",
        nargs="*",
        type=Path,
        help="FCS files (or use --manifest); without a manifest each sample is named by its file name "
        "without the folder, so two files of one name are refused",
    )
    parser.add_argument(
        "--template",
        required=True,
        type=Path,
        help="gating template (.yaml, Gating-ML .xml, or a FlowJo 10 .wsp: each file of the workspace is "
        "gated with its own sample's gates)",
    )
    parser.add_argument(
        "--out",
        required=True,
        type=Path,
        help="output folder: new, empty or one `cytopipe gate` wrote (never a folder of other files; "
        "with FILES, not a `cytopipe run` folder); writes population_stats.parquet, "
        "gate_flags.parquet, gate_fits.parquet",
    )
    parser.add_argument(
        "--manifest",
        type=Path,
        help="manifest CSV (file, sample_id, patient_id, visit, arm[, batch]); without FILES, gates every file in it",
    )
    parser.add_argument("--no-pool", action="store_true", help="do not pool data-driven gates across files")
    parser.add_argument(
        "--gatingml", action="store_true", help="also write each sample's fitted gates as Gating-ML"
    )
    parser.add_argument(
        "--flowjo",
        action="store_true",
        help="also write every sample's fitted gates as OUT/gates.wsp (FlowJo 10)",
    )
    parser.add_argument(
        "--missing-markers",
        choices=["stop", "skip"],
        default="stop",
        help="a template marker absent from EVERY file: stop before gating (default, exit 2) or gate "
        "everything else and report its populations as 'not measured'",
    )
    parser.add_argument(
        "--examples",
        type=Path,
        help="reviewed gates of a few of the FILES (cytopipe examples .yaml/.json from `cytopipe review`, "
        "a FlowJo .wsp or a Gating-ML .xml): every other file gets them by density-landmark alignment "
        "(gate source 'learned'; see docs/gating.md, Learned gates)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="print only warnings and errors")


def _read_manifest(path: Path) -> pd.DataFrame:
    try:
        from cytopipe.manifest import load_manifest
    except ImportError:
        load_manifest = None
    if load_manifest is not None:
        m = load_manifest(path)
        return m if isinstance(m, pd.DataFrame) else pd.DataFrame(m)
    try:
        m = pd.read_csv(path, dtype={"sample_id": str, "patient_id": str})
    except (OSError, ValueError) as exc:
        raise ManifestError(f"cannot read the manifest: {exc}", file=path) from None
    missing = [c for c in ("file", "sample_id") if c not in m.columns]
    if missing:
        raise ManifestError(f"missing column(s) {missing}", file=path)
    return m


def _blank(v) -> str:
    """A manifest cell as text ('' for a blank or missing one)."""
    return "" if v is None or pd.isna(v) else str(v).strip()


def assign_fmo_sets(controls: list[dict], samples: list[dict]) -> tuple[list, list[tuple[dict, str]]]:
    """Which FMO set each sample is gated with: ``([(label, {marker: control row}) or None per
    sample], [(control row, problem)])``.

    FMO rows (``control`` = ``fmo:<marker>``) form sets by their (batch, site). A sample takes the
    set of its own batch; else the earliest set (by ``acquired_at``, then batch) of its site; else
    the study's set (FMO rows with neither batch nor site); else none (its FMO gates use the
    landmark rule, flagged). A marker twice in one set: the first row is used, the other is a
    problem (named by file)."""
    sets: dict[tuple[str, str], dict[str, dict]] = {}
    when: dict[tuple[str, str], tuple[str, str]] = {}
    problems: list[tuple[dict, str]] = []
    for c in controls:
        key = (_blank(c.get("batch")), _blank(c.get("site")))
        marker = str(c["control"]).split(":", 1)[1].strip()
        members = sets.setdefault(key, {})
        label = f"batch {key[0]}" if key[0] else (f"site {key[1]}" if key[1] else "study")
        if marker in members:
            problems.append(
                (
                    c,
                    f"a second FMO control of {marker} in {label} (first: {members[marker]['file']}); "
                    "give each FMO set one control per marker, or a batch value per set",
                )
            )
            continue
        members[marker] = c
        t = (_blank(c.get("acquired_at")), key[0])
        when[key] = min(when.get(key, t), t)
    out = []
    for s in samples:
        batch, site = _blank(s.get("batch")), _blank(s.get("site"))
        hit = None
        if batch:
            same = [k for k in sets if k[0] == batch]
            hit = next((k for k in same if k[1] == site), same[0] if same else None)
        if hit is None and site:
            of_site = sorted((k for k in sets if k[1] == site), key=lambda k: when[k])
            hit = of_site[0] if of_site else None
        if hit is None and ("", "") in sets:
            hit = ("", "")
        if hit is None:
            out.append(None)
            continue
        label = f"batch {hit[0]}" if hit[0] and hit[0] == batch else (f"site {hit[1]}" if hit[1] else "study")
        out.append((label, sets[hit]))
    return out, problems


def _fmo_controls(args) -> list[dict]:
    """The manifest's FMO control rows (``control: fmo:CXCR5``), ``file`` resolved."""
    if not args.manifest:
        return []
    manifest = _read_manifest(args.manifest)
    if "control" not in manifest.columns:
        return []
    out = []
    for r in manifest.to_dict("records"):
        if not _blank(r.get("control")).lower().startswith("fmo:"):
            continue
        path = Path(str(r["file"]))
        out.append({**r, "path": path if path.is_absolute() else args.manifest.parent / path})
    return out


def _samples(args) -> list[tuple[Path, dict]]:
    """(FCS path, sample metadata) for every file to gate."""
    manifest = _read_manifest(args.manifest) if args.manifest else None
    rows: dict[Path, dict] = {}
    if manifest is not None:
        base = args.manifest.parent
        if "control" in manifest.columns:  # compensation controls are not samples to gate
            manifest = manifest[
                manifest["control"].isna() | (manifest["control"].astype(str).str.strip() == "")
            ]
        for r in manifest.to_dict("records"):
            path = Path(str(r["file"]))
            path = (base / path) if not path.is_absolute() else path
            meta = {k: (None if pd.isna(v) else v) for k, v in r.items() if k != "file"}
            rows[path.resolve()] = meta
    files = args.files or [p for p in rows]
    if not files:
        raise CytopipeError("no FCS files given (list them, or give --manifest)")
    out = []
    seen: dict[Path, Path] = {}  # resolved path -> the path as first given
    for f in files:
        resolved = Path(f).resolve()
        if resolved in seen:  # the same file twice (a shell glob and a name): gated once
            logger.warning("file '%s' is listed more than once; it is gated once", seen[resolved])
            continue
        seen[resolved] = Path(f)
        meta = rows.get(resolved)
        if meta is None and manifest is not None:
            by_name = [m for p, m in rows.items() if p.name == Path(f).name]
            meta = by_name[0] if len(by_name) == 1 else None
        out.append((Path(f), meta or {"sample_id": Path(f).stem}))
    _check_unique_sample_ids(out)
    return out


def _check_unique_sample_ids(samples: list[tuple[Path, dict]]) -> None:
    """Two files one sample id (``siteA/P01.fcs`` and ``siteB/P01.fcs`` without a manifest) would
    mix two samples' rows in one table and write one's exports over the other's: refuse."""
    files: dict[str, list[Path]] = {}
    for path, meta in samples:
        files.setdefault(str(meta["sample_id"]), []).append(path)
    clashes = {sid: paths for sid, paths in files.items() if len(paths) > 1}
    if clashes:
        sid, paths = next(iter(clashes.items()))
        listed = ", ".join(f"'{p}'" for p in paths)
        more = (
            f" (and {len(clashes) - 1} more sample id(s) shared by several files)" if len(clashes) > 1 else ""
        )
        raise ManifestError(
            f"{len(paths)} different files would be the one sample '{sid}': {listed}{more}; a sample is "
            "named by its file name without the folder, so give a manifest (--manifest, with a "
            "sample_id per file) or rename the files so that each name is unique"
        )


def _tailored(template: Path) -> bool:
    """Whether the template is a Cytobank export with gates tailored to single files."""
    if template.suffix.lower() != ".xml":
        return False
    from lxml import etree

    from cytopipe.gating.cytobank import is_cytobank, tailored_files

    try:
        root = etree.parse(str(template)).getroot()
    except (OSError, etree.XMLSyntaxError):
        return False
    return is_cytobank(root) and bool(tailored_files(root))


def _learner(args, template, samples):
    """The learner of ``--examples``: the example samples must be among the files gated."""
    from cytopipe.gating.learn import Learner, read_example_transforms, read_examples
    from cytopipe.gating.loading import read_sample

    examples = read_examples(args.examples, template)
    transforms = read_example_transforms(args.examples)  # the scales the reviewed gates were drawn on
    by_id = {str(meta["sample_id"]): path for path, meta in samples}
    missing = [e.sample_id for e in examples if e.sample_id not in by_id]
    if missing:
        raise ManifestError(
            f"the examples' sample(s) {missing} are not among the files to gate; add their FCS files "
            "(their events are what the gates are learned from)",
            file=args.examples,
        )
    samples = {e.sample_id: read_sample(by_id[e.sample_id], template) for e in examples}
    return Learner(template, examples, samples, transforms=transforms)


def _refuse_run_folder(out: Path) -> None:
    """The single-process gating writes ``population_stats.parquet`` and little else: into a run
    folder (``run.json``: ``cytopipe run`` or ``cytopipe gate --manifest``) it would replace the
    run's table and leave its samples, catalog and report describing the run. Refused (exit 2)."""
    from cytopipe.errors import StoreError
    from cytopipe.store import RUN_JSON

    if (out / RUN_JSON).is_file():
        raise StoreError(
            "this is the run folder of a `cytopipe run` (or `cytopipe gate --manifest`): gating FCS "
            "files into it would replace its population_stats.parquet and leave its samples.parquet, "
            "catalog and report describing the run. Choose a new or an empty folder for --out (to "
            "redo the run, run its command again)",
            file=out,
        )


def _make_folder(out: Path) -> None:
    from cytopipe.errors import OutputWriteError

    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # read-only, no permission, disk full: exit 4, fix and rerun
        raise OutputWriteError.from_oserror(Path(exc.filename or out), exc) from None


def _workspace(template: Path):
    """The FlowJo workspace of a ``.wsp`` template with several samples (None otherwise): each file
    it lists is gated with its own sample's gates, as FlowJo gated it."""
    if template.suffix.lower() != ".wsp":
        return None
    from cytopipe.gating.flowjo import FlowJoWorkspace

    workspace = FlowJoWorkspace(template)
    return workspace if len(workspace.samples) > 1 else None


def _workspace_template(workspace, path: Path, default):
    """The gates of the workspace sample ``path`` belongs to; a file the workspace does not list
    gets ``default`` (the first sample's gates), with a warning naming both."""
    own = workspace.sample_for_file(path)
    if own is not None:
        return workspace.template(own.name)
    message = (
        f"file '{path}' is not a sample of the FlowJo workspace '{workspace.path.name}'; it is gated with "
        f"the gates of its first sample, '{workspace.sample().name}'"
    )
    logger.warning(message)  # on stderr as "cytopipe gate: warning: ..."
    return default


def run(args) -> int:
    from cytopipe.gating import load_template
    from cytopipe.store import RunLock, check_output_folder

    # --out: a new or empty folder, or one cytopipe wrote; a file, or a folder with someone
    # else's files, is refused before any work (exit 2)
    check_output_folder(args.out)
    _refuse_run_folder(Path(args.out))
    workspace = _workspace(Path(args.template))  # FlowJo: each file gets its own sample's gates
    template = workspace.template() if workspace is not None else load_template(args.template)
    samples = _samples(args)
    _make_folder(args.out)
    with RunLock(args.out, "gate"):  # never two commands writing one folder
        return _gate_files(args, template, samples, workspace)


def _gate_files(args, template, samples: list[tuple[Path, dict]], workspace=None) -> int:
    from cytopipe.gating import gate, pool_estimates
    from cytopipe.gating.loading import preprocessing_note, read_sample

    own_copy = _tailored(args.template)  # Cytobank: each file is gated with the gates tailored to it
    say = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr))
    note = preprocessing_note(template)  # Gating-ML/FlowJo gates: preprocessed values
    if note:
        logger.info("FCS files read with the usual FCS preprocessing: %s", note)
        say(f"reading the FCS files with the usual FCS preprocessing: {note}")
    failures: dict[str, str] = {}

    # a marker absent from every file: one message before any work (not one failure per file)
    from cytopipe.gating.check import channel_tables, check_study_markers, marker_table

    readable = {}
    for p, _ in samples:
        try:
            tables = channel_tables([p])
            marker_table(template, tables)  # e.g. a `panel:` channel this file lacks
        except CytopipeError:
            continue  # a broken file, or one the template cannot gate, fails alone below
        readable.update(tables)
    skipped = check_study_markers(template, readable, policy=args.missing_markers)
    for m in skipped:
        say(f"not measured in any file: {m.marker} ({', '.join(m.populations)})")

    # FMO controls (`control: fmo` gates): the set of the sample's batch, else site, else study
    wants_fmo = any(
        f.options.get("control") == "fmo" for p in template for _, f in getattr(p.gate, "fit_items", list)()
    )
    fmo_rows = _fmo_controls(args) if wants_fmo else []
    fmo_sets = assign_fmo_sets(fmo_rows, [m for _, m in samples])[0] if fmo_rows else [None] * len(samples)
    set_of = {str(m["sample_id"]): s for (_, m), s in zip(samples, fmo_sets)}
    loaded: dict[Path, object] = {}

    def controls_for(meta: dict) -> dict:
        chosen = set_of.get(str(meta.get("sample_id")))
        if chosen is None:
            return {}
        out = {}
        for m, c in chosen[1].items():
            p = Path(c["path"])
            if p not in loaded:
                try:
                    loaded[p] = read_sample(p, template)
                except CytopipeError as exc:
                    say(f"FMO control {c['file']} unreadable, not used: {exc}")
                    loaded[p] = None
                else:
                    loaded[p].path = Path(str(c["file"]))  # notes name the manifest's file
            if loaded[p] is not None:
                out[m] = loaded[p]
        return out

    pooled = None
    fits = []
    if template.data_driven and len(samples) > 1 and not args.no_pool:
        say(f"pass 1/2: fitting {len(template.data_driven)} data-driven gate(s) on {len(samples)} files")
        for path, meta in samples:
            try:
                result = gate(
                    read_sample(path, template),
                    template,
                    sample_meta=meta,
                    medians=False,
                    controls=controls_for(meta),
                )
                fits.append(result.fit_records(meta["sample_id"]))
            except GatingError:
                # a gate this file cannot fit, with nothing to fall back on yet: the other files'
                # pooled estimate, made below, may be it; pass 2 gates the file again with it
                continue
            except CytopipeError as exc:
                failures[str(meta["sample_id"])] = str(exc)
        if fits:
            manifest = pd.DataFrame([m for _, m in samples])
            pooled = pool_estimates(pd.concat(fits, ignore_index=True), manifest)

    learner = _learner(args, template, samples) if getattr(args, "examples", None) else None
    stats, flags, own_fits = [], [], []
    for_flowjo: dict[str, tuple] = {}
    for i, (path, meta) in enumerate(samples, 1):
        sid = str(meta["sample_id"])
        if sid in failures:
            continue
        try:
            sample = read_sample(path, template)
            tpl = template
            if own_copy:
                from cytopipe.gating.loading import read_gatingml

                tpl = read_gatingml(args.template, fcs_file=path)
            if workspace is not None:
                tpl = _workspace_template(workspace, path, template)
            if learner is not None:
                result = learner.gate(
                    sample, sample_id=sid, pooled=pooled, sample_meta=meta, controls=controls_for(meta)
                )
            else:
                result = gate(sample, tpl, pooled=pooled, sample_meta=meta, controls=controls_for(meta))
        except CytopipeError as exc:
            failures[sid] = str(exc)
            say(f"[{i}/{len(samples)}] {sid}: FAILED: {exc}")
            continue
        table = result.to_population_stats(meta)
        if learner is not None:
            from cytopipe.gating.learn import source_columns

            table = source_columns(table, result)
        stats.append(table)
        flags.append(result.flags_table(meta))
        own_fits.append(result.fit_records(sid))
        if args.gatingml:
            from cytopipe.gating.export import write_gatingml

            (args.out / "gatingml").mkdir(exist_ok=True)
            write_gatingml(result, args.out / "gatingml" / f"{sid}.xml")
        if args.flowjo:  # only the gates, counts and scales are kept for the export, not the events
            from cytopipe.gating.wsp_export import chain_counts

            result.chain_counts = chain_counts(result, sample)  # AND gates' intermediate populations
            result._idx, result._masks = {}, {}
            # FlowJo names a sample by its file; two files with one name (other folders) keep both
            key = path.name if path.name not in for_flowjo else f"{sid} ({path.name})"
            for_flowjo[key] = (path, result)
        n_flags = len(result.flags)
        say(
            f"[{i}/{len(samples)}] {sid}: {result.n_events} events"
            + (f", {n_flags} flag(s)" if n_flags else "")
        )

    if stats:
        from cytopipe.store import atomic_write_parquet  # temporary file, fsync, rows read back, rename

        atomic_write_parquet(args.out / "population_stats.parquet", pd.concat(stats, ignore_index=True))
        atomic_write_parquet(args.out / "gate_flags.parquet", pd.concat(flags, ignore_index=True))
        fit_table = pd.concat(own_fits, ignore_index=True)
        fit_table["params"] = fit_table["params"].map(lambda p: None if p is None else list(p))
        atomic_write_parquet(args.out / "gate_fits.parquet", fit_table)
    if for_flowjo:
        from cytopipe.gating.wsp_export import write_flowjo_workspace

        write_flowjo_workspace(args.out / "gates.wsp", for_flowjo, group=template.name)
        say(f"wrote {args.out / 'gates.wsp'} (FlowJo 10 workspace, {len(for_flowjo)} sample(s))")
    if stats:
        say(f"wrote {args.out / 'population_stats.parquet'} ({len(stats)} sample(s))")
    for sid, err in failures.items():
        print(f"cytopipe gate: {sid}: {err}", file=sys.stderr)
    if failures:
        print(
            f"cytopipe gate: completed with failures ({len(failures)} of {len(samples)} files; exit code 3)",
            file=sys.stderr,
        )
        return 3  # completed with failures, as every command (1 is an internal error)
    return 0
