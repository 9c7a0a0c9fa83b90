"""Assemble and write a report: load the run, build the sections, check blinding, write files."""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cytopipe.errors import ReportError


def build_report(
    run_dir: str | Path,
    *,
    blinded: bool = False,
    out: str | Path | None = None,
    blind_key: Mapping[str, str] | str | Path | None = None,
    clinical: Any = None,
    max_gallery: int = 36,
) -> Path:
    """See :func:`cytopipe.report.write_report`."""
    # Figures are matplotlib Figure objects drawn on their own Agg canvas (no pyplot): nothing opens a
    # window, nothing stays registered, and the caller's matplotlib backend is left alone.
    from cytopipe.report import html as H
    from cytopipe.report.blinding import find_leaks
    from cytopipe.report.data import load_run
    from cytopipe.report.figures import style_context
    from cytopipe.report.sections import Builder, build_sections

    run_dir = Path(run_dir)
    out_path = Path(out) if out is not None else run_dir / "report.html"
    if out_path.suffix.lower() not in (".html", ".htm"):
        raise ReportError("the report file must end in .html", file=out_path)
    tables_dir = out_path.parent / f"{out_path.stem}_tables"
    data = load_run(run_dir, blinded=blinded, blind_key=blind_key, clinical=clinical)

    with style_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=UserWarning)  # e.g. tight layout hints on tiny panels
        builder = Builder(data, tables_href=tables_dir.name, max_gallery=max_gallery)
        sections = build_sections(builder)
    title = f"{data.study}: run report" + (" (blinded)" if data.blinded else "")
    n = data.population_stats["sample_id"].nunique()
    subtitle = (
        f"{n} samples, {data.population_stats['patient_id'].nunique()} patients, arms: {', '.join(data.arms)}"
    )
    page = H.page(title, subtitle, sections)
    csvs = {name: df.to_csv(index=False) for name, df in builder.tables.items()}

    if data.blinded:
        # the page's text without the base64 figure data (any short string occurs in it by chance);
        # what the figures show is checked from their collected text instead
        page_text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:", page)
        texts = {"report.html": page_text, **{f"{name}.csv": text for name, text in csvs.items()}}
        for fig in builder.figures:
            texts[f"figure {fig.name}"] = "\n".join([fig.alt, *fig.texts])
        leaks = find_leaks(texts, data.codes)
        if leaks:  # fail closed: nothing is written
            raise ReportError(
                "blinded report would show arm names (" + "; ".join(leaks[:5]) + "); nothing was written. "
                "Please report this",
                file=out_path,
            )

    if data.blinded and data.folder_codes is None:
        # blinding is a property of the run folder: from now on every command writes it blinded
        from cytopipe.report.blinding import blinded_info, new_record, recode_folder

        record = new_record(data.codes, "cytopipe report --blinded", previous=data.info.get("blinding"))
        recode_folder(run_dir, data.codes, blinded_info(data.info, data.codes, record))
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tables_dir.mkdir(exist_ok=True)
    for old in tables_dir.glob("*.csv"):  # a previous report's tables (perhaps unblinded) go
        old.unlink()
    for name, text in csvs.items():
        _atomic_write(tables_dir / f"{name}.csv", text)
    _atomic_write(out_path, page)
    return out_path


def _atomic_write(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as fh:
            fh.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
