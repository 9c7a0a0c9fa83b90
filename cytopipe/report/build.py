"""Assemble and write a report: load the run, build the sections, check blinding, write files."""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cytopipe.config import MAX_GALLERY
from cytopipe.errors import ReportError
from cytopipe.tabular import csv_text


def build_report(run_dir: str | Path, **options: Any) -> Path:
    """See :func:`cytopipe.report.write_report` (and :func:`_build_report`). A blinded report that
    stops before it blinds the folder (e.g. a user's file showing an arm) leaves the folder as it
    was: the secret it made to code the arms (``.cache/run.secret``) is removed again."""
    # scipy's own BLAS loaded now, so that one_thread below limits it too (the report loads it
    # anyway: its statistics, the cluster tree's layout)
    import scipy.linalg  # noqa: F401

    from cytopipe.report.blinding import folder_record
    from cytopipe.store import RUN_SECRET
    from cytopipe.threads import one_thread

    cache = Path(run_dir) / ".cache"
    had_cache, had_secret = cache.is_dir(), (cache / RUN_SECRET).exists()
    try:
        # BLAS on one thread: the report's products are small (the L-BFGS-B steps of the cluster
        # tree's Kamada-Kawai layout on 100 nodes, model fits), where a second BLAS thread only
        # spins against the gallery's helper process: the layout took ~6x the CPU with two
        # (cytopipe/threads.py: results do not depend on it)
        with one_thread():
            return _build_report(run_dir, **options)
    except BaseException:
        if not had_secret and folder_record(run_dir) is None:  # not blinded: its secret keys nothing
            (cache / RUN_SECRET).unlink(missing_ok=True)
            if not had_cache:
                try:
                    cache.rmdir()  # only when empty
                except OSError:
                    pass
        raise


@contextlib.contextmanager
def _long_lived_frozen() -> Any:
    """Yields a function that moves every object alive now into the garbage collector's permanent
    generation (after a collection: no garbage is kept), called before each section; all are given
    back to the collector at the end.

    Why: a report's figures make many short-lived reference cycles, so the collector runs its full
    pass several times per report, and each walked every object alive: the imported modules'
    (pandas, matplotlib, scipy: ~230,000 objects, most imported while the sections are built) and
    the run's tables. On a small run that was ~0.65 s of the main process's ~5.5 s of CPU
    (measured with gc.callbacks); frozen, the full passes walk only the objects made since. Objects
    freed by reference counting (most) are freed as before; a reference cycle made in one section
    that outlives it is collected after the report instead of during it. Nothing is frozen when the
    caller froze objects itself or turned the collector off."""
    if gc.get_freeze_count() or not gc.isenabled():
        yield lambda: None
        return

    def freeze() -> None:
        gc.collect()  # walks only what is not frozen yet
        gc.freeze()

    gc.freeze()
    try:
        yield freeze
    finally:
        gc.unfreeze()


def _build_report(
    run_dir: str | Path,
    *,
    blinded: bool = False,
    out: str | Path | None = None,
    blind_key: Mapping[str, str] | str | Path | None = None,
    clinical: Any = None,
    max_gallery: int = MAX_GALLERY,
    reuse: bool = True,
    helper: bool | None = None,
    problems: list[str] | None = None,
) -> Path:
    """See :func:`cytopipe.report.write_report`. ``helper``: draw the gate gallery in a helper
    process beside the other sections (``None``: when two or more CPUs are available).
    ``problems``: the clinical table's problems are appended to it (also when the report is reused:
    they are kept with the report's cache key)."""
    # Figures are matplotlib Figure objects drawn on their own Agg canvas (no pyplot): nothing opens a
    # window, nothing stays registered, and the caller's matplotlib backend is left alone.
    from cytopipe.report import html as H
    from cytopipe.report.blinding import find_leaks, folder_record
    from cytopipe.report.data import load_run
    from cytopipe.report.figcache import FigureCache
    from cytopipe.report.figures import style_context
    from cytopipe.report.pagecheck import page_leaks
    from cytopipe.report.sections import Builder, build_sections
    from cytopipe.report.tables_folder import plan_tables, write_tables

    run_dir = Path(run_dir)
    out_path = Path(out) if out is not None else run_dir / "report.html"
    if out_path.suffix.lower() not in (".html", ".htm"):
        raise ReportError("the report file must end in .html", file=out_path)
    tables_dir = out_path.parent / f"{out_path.stem}_tables"
    for path, what in ((out_path, "the report file"), (tables_dir, "the folder of the report's tables")):
        if path.exists() and path.is_dir() != (path == tables_dir):  # never written over: a user's file
            raise ReportError(
                f"{path.name} is in the way of {what} (it is a {'folder' if path.is_dir() else 'file'}); "
                "move or rename it, then run `cytopipe report RUN_DIR` (or give the report another place "
                "with --out)",
                file=path,
            )
    _refuse_inputs_in_tables(run_dir, tables_dir, clinical, blind_key)
    key = report_key(run_dir, blinded=blinded, out=out_path, blind_key=blind_key, clinical=clinical,
                     max_gallery=max_gallery)  # fmt: skip
    if reuse and key is not None and _is_current(run_dir, key, out_path):
        if problems is not None:
            problems += _marker(run_dir, key).get("clinical_problems") or []
        return out_path
    if blinded and folder_record(run_dir) is None:  # to be blinded now: checked before its secret is made
        from cytopipe.report.armcheck import refuse_number_arms

        arms = _plain_arms(run_dir, clinical)
        refuse_number_arms(arms, "Nothing was written.")  # first: digits show in every file
        _check_blinded(run_dir, out_path, arms)
    data = load_run(run_dir, blinded=blinded, blind_key=blind_key, clinical=clinical)
    if data.blinded:  # a CSV in the tables folder showing an arm: refused now, before the work
        # (plan_tables checks again before anything is written); the message names no arm: in a
        # run it is a problem in run.json, where a code would replace it, next to the file's name
        _check_blinded(run_dir, out_path, data.codes)
    # the figures of the previous report that nothing they are drawn from has changed (content hashes)
    cache = FigureCache(run_dir, read=reuse)

    with style_context(), warnings.catch_warnings(), _long_lived_frozen() as freeze:
        warnings.simplefilter("ignore", category=UserWarning)  # e.g. tight layout hints on tiny panels
        builder = Builder(
            data, tables_href=tables_dir.name, max_gallery=max_gallery, helper=helper, cache=cache
        )
        try:
            sections = build_sections(builder, between=freeze)
            title = f"{data.study}: run report" + (" (blinded)" if data.blinded else "")
            n = data.population_stats["sample_id"].nunique()
            patients = data.population_stats["patient_id"].nunique()
            subtitle = f"{H.count(n, 'sample')}, {H.count(patients, 'patient')}, arms: {', '.join(data.arms)}"
            page = builder.fill(H.page(title, subtitle, sections))
        finally:
            builder.gallery.close()  # a section that failed: the helper stops drawing
    # formula-like cells (=, +, -, @ ...) escaped: lab members open these in spreadsheets
    csvs = {name: csv_text(df) for name, df in builder.tables.items()}
    files = {f"{name}.csv": text for name, text in csvs.items()}
    # what happens to the CSV files already in the tables folder, checked before anything is written
    leaks = functools.partial(find_leaks, arms=data.codes) if data.blinded else None
    plan = plan_tables(tables_dir, files, leaks=leaks)

    if data.blinded:
        # the page as a reader reads it: its text and the attributes that carry data, not its markup
        # nor the base64 figure data (any short string occurs in it by chance): what the figures
        # show is checked from their collected text instead (cytopipe/report/pagecheck.py); a CSV
        # file cell by cell, each on its line, as blinding coded its table's values
        texts = {f"{name}.csv": _cells(text) for name, text in csvs.items()}
        for fig in builder.figures:
            texts[f"figure {fig.name}"] = "\n".join([fig.alt, *fig.texts])
        leaks = page_leaks(page, data.codes) + find_leaks(texts, data.codes)
        if leaks:  # fail closed: nothing is written
            raise ReportError(
                "blinded report would show arm names (" + "; ".join(leaks[:5]) + "); nothing was written. "
                "Please report this",
                file=out_path,
            )

    recoded = False
    if data.blinded and data.folder_codes is None:
        # blinding is a property of the run folder: from now on every command writes it blinded
        from cytopipe.report.blinding import blinded_info, new_record, recode_folder

        record = new_record(
            data.codes, "cytopipe report --blinded", run_dir, previous=data.info.get("blinding")
        )
        # this report replaces out_path (and its tables) and names the files kept there (write_tables), once
        recode_folder(
            run_dir, data.codes, blinded_info(data.info, data.codes, record), report=(out_path, tables_dir)
        )
        recoded = True
    elif data.folder_codes is not None:  # e.g. a copied folder (its secret left behind): keyed anew
        from cytopipe.report.blindrecord import rekey_folder

        recoded = rekey_folder(run_dir, data.folder_codes)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_tables(
        plan, files, write_csv_text
    )  # a previous report's tables (perhaps unblinded) go; a user's files stay
    _atomic_write(out_path, page)
    cache.prune()  # the cache keeps this report's figures only
    if key is not None:
        # the key of what this report was made from: the one computed before reading the inputs (an
        # input written meanwhile, e.g. a sign-off's review.json, must make the next call rebuild),
        # computed again only when blinding rewrote the folder
        if recoded:
            key = report_key(run_dir, blinded=blinded, out=out_path, blind_key=blind_key, clinical=clinical,
                             max_gallery=max_gallery)  # fmt: skip
        marker = run_dir / ".cache" / "report"
        marker.mkdir(parents=True, exist_ok=True)
        for old in marker.glob("*.json"):
            old.unlink()
        _atomic_write(marker / f"{key}.json", json.dumps({"out": str(out_path.resolve()),
                                                          "clinical_problems": data.clinical_problems}))  # fmt: skip
    if problems is not None:
        problems += data.clinical_problems
    return out_path


def _cells(text: str) -> str:
    """The cells of a CSV text (header included), one per line: each starts where a reader sees it
    start (a cell ``A gate ...`` begins with the article, ``A`` after a comma would not)."""
    import csv
    import io

    return "\n".join(cell for row in csv.reader(io.StringIO(text)) for cell in row)


def _check_blinded(run_dir: Path, out_path: Path, arms: Iterable[str]) -> None:
    """Refuse a blinded report beside a file that shows an arm (or cannot be checked): in its tables
    folder (:func:`~cytopipe.report.tables_folder.check_blinded_folder`), in the run folder
    (:func:`~cytopipe.report.blindfiles.check_user_files`; ``out_path``, which the report replaces,
    and its own tables in its tables folder aside, as an earlier report's)."""
    from cytopipe.report.blindfiles import check_user_files
    from cytopipe.report.blinding import find_leaks
    from cytopipe.report.tables_folder import check_blinded_folder

    tables_dir = out_path.parent / f"{out_path.stem}_tables"
    leaks = functools.partial(find_leaks, arms=list(arms))
    check_blinded_folder(tables_dir, leaks, name_arms=False, todo="Nothing was written. Move the file out of "
                         "the folder (or delete it), then run the report again")  # fmt: skip
    check_user_files(run_dir, leaks, name_arms=False, report=(out_path, tables_dir), todo="Nothing was written. "
                     "Move the file out of the run folder (or take the arm names out of it), then run the report again")  # fmt: skip


def _plain_arms(run_dir: Path, clinical: Any) -> list[str]:
    """The arm names of a run folder that is not blinded: its tables' ``arm`` columns, and the
    manifest and clinical table of its run (run.json's workflow) or ``clinical``."""
    import pandas as pd

    from cytopipe.report.blinding import source_arms
    from cytopipe.store import read_run_info

    arms: list[str] = []
    for name in ("samples", "population_stats"):
        path = run_dir / f"{name}.parquet"
        try:
            arms += [str(a) for a in pd.read_parquet(path, columns=["arm"])["arm"].dropna().unique()]
        except Exception:  # noqa: BLE001 - no such table or column: the other sources
            pass
    try:
        workflow = read_run_info(run_dir).get("workflow")
    except Exception:  # noqa: BLE001 - no run.json: the tables and ``clinical``
        workflow = None
    arms += source_arms(workflow if isinstance(workflow, Mapping) else None, clinical)
    return [a for a in dict.fromkeys(arms) if a.strip()]


def _marker(run_dir: Path, key: str) -> dict[str, Any]:
    """What was recorded with the current report (its path, the clinical table's problems)."""
    try:
        return json.loads((Path(run_dir) / ".cache" / "report" / f"{key}.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def write_csv_text(path: Path, text: str) -> None:
    """Every CSV of the report is written here (one place to escape spreadsheet formulas when the
    shared CSV helper lands)."""
    _atomic_write(path, text)


#: bump when the report changes for the same inputs (reports are then rewritten)
REPORT_VERSION = "17"
_VOLATILE = ("finished_at", "seconds", "steps", "executor", "cached_samples", "clustered_at", "problems")
_INPUTS = ("population_stats", "samples", "statistics", "clusters", "gate_review")


def report_key(
    run_dir: str | Path,
    *,
    blinded: bool,
    out: Path,
    blind_key: Any,
    clinical: Any,
    max_gallery: int,
) -> str | None:
    """Hash of everything a report is made from: the run folder's tables, review.json, run.json
    (without its timings), the clinical table (and blinding key: keyed with the folder's secret when
    it has one), the options and the report's own code. ``None``: not cacheable (a clinical table
    given as a DataFrame)."""
    import hashlib
    import hmac

    import pandas as pd

    from cytopipe.config import stable_hash
    from cytopipe.store import file_sha256, run_secret

    if isinstance(clinical, pd.DataFrame) or isinstance(blind_key, pd.DataFrame):
        return None
    run_dir = Path(run_dir)
    h = hashlib.sha256(f"report {REPORT_VERSION}\n".encode())
    for src in sorted(Path(__file__).parent.glob("*.py")):  # the report's code
        h.update(src.read_bytes())
    files = [run_dir / f"{name}.parquet" for name in _INPUTS] + sorted((run_dir / "clustering").glob("*"))
    files.append(run_dir / "review.json")  # the gate-review section: sign-off, overrides and reasons
    for path in files:
        if path.is_file():
            h.update(f"{path.name} {file_sha256(path)}\n".encode())
    info: dict[str, Any] = {}
    try:
        info = json.loads((run_dir / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    h.update(stable_hash({k: v for k, v in info.items() if k not in _VOLATILE}).encode())
    h.update(stable_hash(info.get("problems") or []).encode())
    source = clinical if clinical is not None else (info.get("workflow") or {}).get("clinical")
    # the clinical table and the blinding key hold the arms: in a folder with a secret (a blinded
    # one) keyed, so that the key (the name of the marker in .cache/report/) is no plain hash of
    # them to try arm assignments against (as run.json's rerun record: cytopipe/rerun.py)
    secret = run_secret(run_dir)
    for path in (source, blind_key if not isinstance(blind_key, Mapping) else None):
        if path is not None and Path(str(path)).is_file():
            if secret is None:
                h.update(file_sha256(path).encode())
            else:
                h.update(hmac.new(secret, Path(str(path)).read_bytes(), hashlib.sha256).hexdigest().encode())
    options = {"blinded": bool(blinded), "out": str(Path(out).resolve()), "max_gallery": int(max_gallery),
               "key": dict(blind_key) if isinstance(blind_key, Mapping) else str(blind_key)}  # fmt: skip
    h.update(stable_hash(options).encode())
    return h.hexdigest()[:32]


def _refuse_inputs_in_tables(run_dir: Path, tables_dir: Path, clinical: Any, blind_key: Any) -> None:
    """The report replaces the CSV files it wrote in its tables folder: never when a CSV it or the
    run reads is there (the manifest, the clinical table, a compensation matrix, the blind
    key). A :class:`ReportError` (exit 2), before anything is written."""
    if not tables_dir.is_dir():
        return
    try:
        workflow = json.loads((run_dir / "run.json").read_text(encoding="utf-8")).get("workflow") or {}
    except (OSError, ValueError, AttributeError):
        workflow = {}
    compensation = workflow.get("compensation")
    matrix = compensation.get("path") if isinstance(compensation, Mapping) else None
    sources = {
        "the run's manifest": workflow.get("manifest"),
        "the run's clinical table": workflow.get("clinical"),
        "the run's compensation matrix": matrix,
        "the clinical table given": clinical,
        "the blind key": blind_key,
    }
    inputs = {Path(p).resolve(): what for what, p in sources.items() if isinstance(p, (str, Path)) and str(p)}
    for csv in sorted(tables_dir.glob("*.csv")):
        what = inputs.get(csv.resolve())
        if what is not None:
            raise ReportError(
                f"holds {csv.name}, {what}; the report replaces the CSV files of its tables folder "
                f"(<report name>_tables beside the report), so it could replace it. Give --out another "
                "name or folder",
                file=tables_dir,
            )


def _is_current(run_dir: Path, key: str, out: Path) -> bool:
    tables = out.parent / f"{out.stem}_tables"
    return (
        (Path(run_dir) / ".cache" / "report" / f"{key}.json").is_file() and out.is_file() and tables.is_dir()
    )


def report_is_current(run_dir: str | Path, **options: Any) -> bool:
    """True when the report of ``run_dir`` written with ``options`` (those of
    :func:`cytopipe.report.write_report`) is there and its inputs have not changed since."""
    out = Path(options.get("out") or Path(run_dir) / "report.html")
    key = report_key(run_dir, blinded=bool(options.get("blinded")), out=out, blind_key=options.get("blind_key"),
                     clinical=options.get("clinical"), max_gallery=int(options.get("max_gallery") or MAX_GALLERY))  # fmt: skip
    return key is not None and _is_current(Path(run_dir), key, out)


def _atomic_write(path: Path, text: str) -> None:
    """Temporary file, fsync, size check, rename (the old file stays on any failure)."""
    from cytopipe.store import atomic_write_bytes

    atomic_write_bytes(path, text.encode("utf-8"))
