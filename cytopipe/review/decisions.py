"""Review decisions of a run (``RUN_DIR/review.json``): approvals, overrides, reverts, sign-off."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cytopipe.errors import ReviewError

REVIEW_FILE = "review.json"
KINDS = ("approve", "override", "pooled", "revert")
# the pick-list of override reasons (free text is always added)
REASONS = (
    "debris",
    "clog",
    "poor staining",
    "fit failure",
    "gate off the population",
    "low event count",
    "compensation artefact",
    "other",
)


@dataclass
class Decision:
    """One reviewer action on one sample's gate of one population."""

    kind: str  # approve | override | pooled | revert
    sample_id: str
    population: str
    user: str
    params: dict[str, Any] = field(default_factory=dict)  # override: e.g. {"CD25 >=": 3.1}
    reason: str = ""
    category: str = ""  # one of REASONS (overrides)
    at: str = ""  # ISO 8601 UTC
    audit_entry: int | None = None
    before_pct: float | None = None  # % of parent before / after (overrides, filled when applied)
    after_pct: float | None = None
    # a decision carried over from the run this one is a version of: {from_run, by, at, audit_entry}
    # (who made the version, when, and its run.version entry); user, at and audit_entry stay the original's
    carried: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ReviewError(f"unknown review action {self.kind!r}; use one of {', '.join(KINDS)}")
        if self.kind in ("override", "pooled", "revert") and not self.reason.strip():
            raise ReviewError(
                f"a reason is required to {_VERBS[self.kind]}: choose one of {', '.join(REASONS)} and/or "
                "write what you saw",
                sample=self.sample_id,
                population=self.population,
            )
        if self.kind == "override" and not self.params:
            raise ReviewError(
                "an override needs the new gate (e.g. {'CD25 >=': 3.1})",
                sample=self.sample_id,
                population=self.population,
            )
        if not self.at:
            self.at = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class ReviewState:
    """Everything decided about a run's gates, in order, and its sign-off."""

    decisions: list[Decision] = field(default_factory=list)
    signoff: dict[str, Any] | None = None  # {user, meaning, at, audit_entry}
    version: int = 1
    parent_run: str | None = None

    @property
    def locked(self) -> bool:
        return self.signoff is not None

    def add(self, decision: Decision) -> None:
        if self.locked:
            raise ReviewError(
                f"the run's gating was signed off by {self.signoff['user']} at {self.signoff['at']}; "
                "its gates are locked. Make a new version of the run to change a gate",
                sample=decision.sample_id,
                population=decision.population,
            )
        self.decisions.append(decision)

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "parent_run": self.parent_run,
            "signoff": self.signoff,
            "decisions": [dataclasses.asdict(d) for d in self.decisions],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReviewState:
        return cls(
            decisions=[Decision(**d) for d in data.get("decisions", [])],
            signoff=data.get("signoff"),
            version=int(data.get("version", 1)),
            parent_run=data.get("parent_run"),
        )


def read_review(run_dir: str | Path) -> ReviewState:
    """The run's review state (empty when nothing was decided yet)."""
    path = Path(run_dir) / REVIEW_FILE
    if not path.is_file():
        return ReviewState()
    try:
        return ReviewState.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError) as exc:
        raise ReviewError(f"cannot read the review decisions ({exc})", file=path) from None


def write_review(run_dir: str | Path, state: ReviewState) -> Path:
    from cytopipe.store import atomic_write_json

    return atomic_write_json(Path(run_dir) / REVIEW_FILE, state.to_dict())


_VERBS = {"override": "override a gate", "pooled": "use the patient's pooled gate", "revert": "revert a gate"}


def effective_overrides(decisions: Iterable[Decision]) -> dict[tuple[str, str], Decision]:
    """The override in force per (sample, population): the latest override/pooled decision not
    reverted since (approvals do not change a gate)."""
    out: dict[tuple[str, str], Decision] = {}
    for d in decisions:
        key = (d.sample_id, d.population)
        if d.kind in ("override", "pooled"):
            out[key] = d
        elif d.kind == "revert":
            out.pop(key, None)
    return out


def status_of(decisions: Iterable[Decision]) -> dict[tuple[str, str], str]:
    """Review status per (sample, population): approved / overridden / pooled (unreviewed: absent).
    A gate changed after its approval needs approving again only if it changed: an override is
    itself a reviewed gate."""
    out: dict[tuple[str, str], str] = {}
    for d in decisions:
        key = (d.sample_id, d.population)
        if d.kind == "approve":
            out[key] = "approved" if out.get(key) not in ("overridden", "pooled") else out[key]
        elif d.kind == "override":
            out[key] = "overridden"
        elif d.kind == "pooled":
            out[key] = "pooled"
        elif d.kind == "revert":
            out.pop(key, None)
    return out


def polygon_vertices(params: Mapping[str, Any], ndim: int, where: Mapping[str, str]) -> np.ndarray:
    """The ``vertices`` of a polygon override as an (n, 2) array, n >= 3 (ReviewError otherwise)."""
    try:
        vertices = np.asarray(params["vertices"], dtype=np.float64)
    except (TypeError, ValueError):  # a ragged list: a vertex of 1 or 3 numbers
        vertices = np.empty((0, 0))
    if vertices.ndim != 2 or vertices.shape[1] != 2 or len(vertices) < 3 or ndim != 2:
        raise ReviewError("a polygon override needs >= 3 vertices [x, y] on a 2-D gate", **where)
    return vertices


def ellipse_params(
    params: Mapping[str, Any], ndim: int, where: Mapping[str, str]
) -> tuple[np.ndarray, np.ndarray, float]:
    """(centre, covariance, distance_square) of an ellipse override: a centre of ``ndim`` numbers, a
    symmetric positive definite ``ndim`` x ``ndim`` covariance (else there is no ellipse) and a
    distance_square > 0 (default 1); ReviewError naming what is needed otherwise."""
    try:
        center = np.asarray(params["center"], dtype=np.float64)
        cov = np.asarray(params["covariance"], dtype=np.float64)
        d2 = float(params.get("distance_square", 1.0))
    except (KeyError, TypeError, ValueError):
        center, cov, d2 = np.empty(0), np.empty(0), np.nan
    ok = center.shape == (ndim,) and cov.shape == (ndim, ndim) and np.isfinite(d2) and d2 > 0
    if ok and np.all(np.isfinite(cov)) and np.allclose(cov, cov.T, rtol=1e-6, atol=0.0):
        ok = bool(np.linalg.eigvalsh(cov).min() > 0)
    else:
        ok = False
    if not ok:
        raise ReviewError(
            f"an ellipse override needs a centre of {ndim} numbers, a covariance of {ndim} x {ndim} numbers "
            "that is symmetric and positive definite (an ellipse, not a line or a hyperbola) and a "
            "distance_square > 0",
            **where,
        )
    return center, cov, d2
