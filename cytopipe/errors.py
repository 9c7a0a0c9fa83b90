"""The one exception hierarchy of cytopipe.

Every error a user can cause (a bad file, a wrong template, a missing marker) is a
:class:`CytopipeError` subclass whose message names *what* (file, sample, gate,
channel, keyword, offset) and *what to do*. Context is also kept as attributes so
the pipeline can record it per sample without parsing messages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class CytopipeError(Exception):
    """Base class of every error cytopipe raises on purpose.

    ``context`` keys (all optional) are rendered in front of the message in a fixed
    order, e.g. ``file 'a.fcs', channel 'BV421-A': ...``.
    """

    _CONTEXT_ORDER = (
        "file",
        "sample",
        "population",
        "gate",
        "marker",
        "channel",
        "keyword",
        "row",
        "column",
        "key",
    )

    def __init__(self, message: str, **context: Any) -> None:
        self.message = message
        self.context = {k: v for k, v in context.items() if v is not None}
        super().__init__(self._render())

    def _render(self) -> str:
        parts = []
        for key in self._CONTEXT_ORDER:
            if key in self.context:
                value = self.context[key]
                if isinstance(value, Path):
                    value = str(value)
                parts.append(f"{key} {value!r}")
        prefix = ", ".join(parts)
        return f"{prefix}: {self.message}" if prefix else self.message

    def __reduce__(self):  # keep context when pickled across Dask workers
        return (_rebuild, (type(self), self.message, self.context))


def _rebuild(cls: type[CytopipeError], message: str, context: dict[str, Any]) -> CytopipeError:
    return cls(message, **context)


# --- files ------------------------------------------------------------------------------------
class FCSError(CytopipeError):
    """An FCS file is malformed, truncated or inconsistent."""


class FCSHeaderError(FCSError):
    """The HEADER segment is missing, truncated or points outside the file."""


class FCSKeywordError(FCSError):
    """A TEXT keyword is missing, unparsable or contradicts the file."""


class FCSDataError(FCSError):
    """The DATA segment does not match what the keywords describe."""


class FCSUnsupportedError(FCSError):
    """A valid but unsupported FCS feature (e.g. ``$DATATYPE A``)."""


class SpilloverError(FCSError):
    """A spillover keyword (``$SPILLOVER``/``SPILL``/``$COMP``) is malformed."""


class ManifestError(CytopipeError):
    """The manifest CSV is missing columns, has bad rows, or names missing files."""


class PanelError(CytopipeError):
    """A marker cannot be resolved to exactly one channel of a file."""


# --- processing -------------------------------------------------------------------------------
class CompensationError(CytopipeError):
    """A spillover matrix cannot be applied or computed (mismatch, singular, bad controls)."""


class TransformError(CytopipeError):
    """A transform is unknown or its parameters are invalid."""


class TemplateError(CytopipeError):
    """A gating template is invalid (unknown parent, cycle, unknown gate type, missing field)."""


class GatingMLError(TemplateError):
    """A Gating-ML document cannot be read or written."""


class GatingError(CytopipeError):
    """A gate cannot be applied to a sample."""


class QCError(CytopipeError):
    """Quality control cannot run on a sample."""


class ClusteringError(CytopipeError):
    """Clustering cannot train or map (e.g. model/markers mismatch)."""


# --- study level ------------------------------------------------------------------------------
class WorkflowError(CytopipeError):
    """A workflow spec has unknown keys, missing files or bad values."""


class ClinicalDataError(CytopipeError):
    """The clinical table is invalid (missing patients, duplicates, out-of-range values)."""


class StatisticsError(CytopipeError):
    """A statistical analysis cannot be run on the given data."""


class StoreError(CytopipeError):
    """A run folder is missing, incomplete or inconsistent."""


class ReportError(CytopipeError):
    """A report cannot be produced."""


class ServeError(CytopipeError):
    """``cytopipe serve`` cannot start (unsafe host without accounts, bad limits, database)."""


class ReviewError(CytopipeError):
    """A gate review action cannot be applied (unknown sample/population, locked run, bad gate)."""
