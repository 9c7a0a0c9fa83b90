"""The previous report's figures, kept for the next one (``RUN_DIR/.cache/report-figures/``).

A report is rebuilt whenever one of its inputs changes: in ``cytopipe serve`` after every saved
gate change, approval and sign-off. Most of its figures were made from data that did not change
(an approval changes none; a gate change on one sample leaves the cluster figures and the gallery
panels of the other populations as they were), and drawing them is most of the report's time.

A figure is named by what it is drawn from: the figure function, the *content* of its arguments
(:func:`content_hash`: array bytes, table columns and values, every number and string with its
type; never object identities or timestamps), its name and alt text, the source of the report's
and the clustering plots' code, and the versions of the drawing libraries. A figure whose name is
in the cache is read back instead of drawn: the same PNG bytes and texts as drawing it again
(figures are deterministic; ``tests/test_review_refresh.py`` compares a refreshed report with one
built from scratch). A figure function that changes its own arguments while drawing is never
cached (the section after it sees those changes); arguments whose content cannot be hashed are
drawn every time.

Entries are JSON (never pickle: a run folder is data, not code). After a report is written, the
entries it did not use are removed, so the cache holds one report's figures. Blinding a folder
(:func:`cytopipe.report.blinding.scrub_cache`) removes every entry: their names hash data that held
the arms.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from cytopipe.config import Unhashable, content_hash
from cytopipe.report.figures import Rendered, render

log = logging.getLogger(__name__)

#: the cache's folder inside a run folder
CACHE_DIR = Path(".cache") / "report-figures"
#: bump when an entry's layout changes
FORMAT = "1"
#: the libraries a figure's pixels depend on (their versions are part of every entry's name)
_LIBRARIES = ("matplotlib", "numpy", "pandas", "pillow", "scipy", "networkx")


@dataclasses.dataclass(frozen=True)
class Plot:
    """A figure not made yet: ``fn(*args, **kwargs)`` returns the matplotlib Figure."""

    fn: Callable[..., Any]
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def make(self) -> Any:
        return self.fn(*self.args, **self.kwargs)


def plot(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Plot:
    """``fn(*args, **kwargs)``, drawn only when the report's cache does not hold it."""
    return Plot(fn, args, dict(kwargs))


def _code_hash() -> str:
    """The report's and the cluster plots' source, the drawing libraries' versions, the format."""
    from importlib import metadata

    import cytopipe

    h = hashlib.sha256(f"report figures {FORMAT} {cytopipe.__version__}\n".encode())
    root = Path(__file__).resolve().parents[1]
    for src in sorted([*(root / "report").glob("*.py"), *(root / "cluster").glob("*.py")]):
        h.update(src.name.encode() + b"\0" + src.read_bytes())
    for lib in _LIBRARIES:
        try:
            version = metadata.version(lib)
        except metadata.PackageNotFoundError:
            version = "-"
        h.update(f"{lib} {version}\n".encode())
    return h.hexdigest()


class FigureCache:
    """The figures of one report build: read from ``RUN_DIR/.cache/report-figures`` when there
    (``read=False``: drawn anyway, e.g. ``cytopipe report --rebuild``), written there when drawn,
    the unused ones removed by :meth:`prune` after the report is written. ``run_dir=None``: no
    cache (every figure drawn)."""

    def __init__(self, run_dir: str | Path | None, read: bool = True):
        self.folder = Path(run_dir) / CACHE_DIR if run_dir is not None else None
        self.read = read
        self._code = _code_hash() if self.folder is not None else ""
        self.used: set[str] = set()
        self.hits = self.drawn = 0

    def key(
        self, fn: Callable[..., Any], args: tuple, kwargs: Mapping[str, Any], name: str, alt: str
    ) -> str | None:
        """The entry's name, or ``None`` when the figure is not cached (no cache, unhashable arguments)."""
        if self.folder is None:
            return None
        try:
            content = content_hash((args, dict(kwargs)))
        except Unhashable as exc:
            log.debug("report: figure %s drawn without the cache (%s)", name, exc)
            return None
        what = f"{self._code}\n{fn.__module__}.{fn.__qualname__}\n{content}\n{name}\n{alt}"
        return hashlib.sha256(what.encode("utf-8")).hexdigest()[:40]

    def get(self, key: str | None) -> Rendered | None:
        """The cached figure of ``key`` (checked: its own key and the checksum of its PNG), else None."""
        if key is None or self.folder is None or not self.read:
            return None
        try:
            entry = json.loads((self.folder / f"{key}.json").read_text(encoding="utf-8"))
            ok = entry["key"] == key and entry["sha256"] == hashlib.sha256(entry["uri"].encode()).hexdigest()
            rendered = Rendered(name=entry["name"], uri=entry["uri"], width=int(entry["width"]),
                                height=int(entry["height"]), alt=entry["alt"], texts=list(entry["texts"]),
                                overlaps=list(entry["overlaps"])) if ok else None  # fmt: skip
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:  # damaged: drawn again (and rewritten)
            log.warning("report: cached figure %s not used (%s); drawing it again", key, exc)
            return None
        if rendered is None:
            log.warning("report: cached figure %s does not match its checksum; drawing it again", key)
            return None
        self.used.add(key)
        self.hits += 1
        return rendered

    def put(self, key: str | None, rendered: Rendered) -> None:
        """Keep a drawn figure (a cache that cannot be written only costs the next report time)."""
        self.drawn += 1
        if key is None or self.folder is None:
            return
        entry = {"key": key, "name": rendered.name, "alt": rendered.alt, "width": rendered.width,
                 "height": rendered.height, "texts": rendered.texts, "overlaps": rendered.overlaps,
                 "uri": rendered.uri, "sha256": hashlib.sha256(rendered.uri.encode()).hexdigest()}  # fmt: skip
        # written under a name of its own, then renamed: a reader sees the whole entry or none. No
        # fsync: an entry cut short by a crash fails its checksum and is drawn again
        # (a temporary name as cytopipe.files.is_temp_name knows them: an orphan is swept by the next run)
        tmp = self.folder / f".{key}.{os.getpid()}.{threading.get_ident()}.tmp"
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(json.dumps(entry).encode("utf-8"))
            os.replace(tmp, self.folder / f"{key}.json")
        except OSError as exc:  # e.g. a read-only run folder: the figures are not kept this time
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            log.warning("report: could not keep the figures for the next report (%s)", exc)
            self.folder = None
            return
        self.used.add(key)

    def render(self, fig: Any, name: str, alt: str) -> Rendered:
        """``fig`` (a :class:`Plot`, or a matplotlib Figure: drawn every time) rendered, or read back."""
        if not isinstance(fig, Plot):
            self.drawn += 1
            return render(fig, name, alt)
        key = self.key(fig.fn, fig.args, fig.kwargs, name, alt)
        got = self.get(key)
        if got is not None:
            return got
        rendered = render(fig.make(), name, alt)
        if key is not None and self.key(fig.fn, fig.args, fig.kwargs, name, alt) != key:
            log.debug("report: figure %s changed its own arguments: not cached", name)
            key = None
        self.put(key, rendered)
        return rendered

    def prune(self) -> None:
        """Remove the entries this report did not use (run after the report is written)."""
        if self.folder is None or not self.folder.is_dir():
            return
        try:
            for path in self.folder.iterdir():
                if path.suffix == ".json" and path.stem not in self.used:
                    path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("report: could not remove the earlier report's figures (%s)", exc)
        log.debug("report: %d figures read from the cache, %d drawn", self.hits, self.drawn)
