"""The one exception hierarchy of cytopipe.

Every error a user can cause (a bad file, a wrong template, a missing marker) is a
:class:`CytopipeError` subclass whose message names *what* (file, sample, gate,
channel, keyword, offset) and *what to do*. Context is also kept as attributes so
the pipeline can record it per sample without parsing messages.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

# Exit codes of every ``cytopipe`` command: one meaning per code.
EXIT_OK = 0  # done (samples may be flagged)
EXIT_INTERNAL = 1  # an internal error: a bug in cytopipe (please report it with the traceback)
EXIT_INPUT = 2  # a usage or input error (bad option, manifest, template, file...): nothing was done
EXIT_FAILURES = 3  # completed with failures (failed files, or problems in study-level steps)
EXIT_OUTPUT = 4  # an output could not be written (disk full, read-only folder, no permission) or the
#                  run folder is in use by another run: fix that and rerun the same command (resumes)
EXIT_INTERRUPTED = 130  # interrupted (Ctrl-C); rerun to resume
EXIT_CODES_HELP = (
    "exit codes: 0 done; 1 internal error (a bug: please report it); 2 usage or input error (nothing "
    "done); 3 completed with failures (see the listed samples/problems); 4 could not write the "
    "output (disk full, read-only, no permission) or the run folder is in use: fix it and rerun, "
    "the run resumes; 130 interrupted."
)


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


class NotRegularFileError(FCSError):
    """The path is a FIFO, a device, a socket or a folder, not a regular file (never read: a FIFO
    would block and a device never ends)."""


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


class OutputWriteError(StoreError):
    """An output file could not be written (disk full, read-only folder, no permission).

    The old version of the file is kept; rerunning the same command after freeing space resumes
    (finished per-sample work is cached)."""

    _ADVICE = {
        errno.ENOSPC: "the disk is full; free space and rerun the same command: the run resumes",
        errno.EDQUOT: "the disk quota is exceeded; free space and rerun the same command: the run resumes",
        errno.EROFS: "the folder is read-only; make it writable (or choose another --out) and rerun: "
        "the run resumes",
        errno.EACCES: "permission denied; make the folder writable (or choose another --out) and rerun: "
        "the run resumes",
        errno.EPERM: "permission denied; make the folder writable (or choose another --out) and rerun: "
        "the run resumes",
    }
    _REASONS = {
        "No space left on device": errno.ENOSPC,
        "Disk quota exceeded": errno.EDQUOT,
        "Read-only file system": errno.EROFS,
        "Permission denied": errno.EACCES,
    }

    # a file where the output path needs a folder (``--out afile.txt/x.h5ad``): not a disk or
    # permission problem (so not in _ADVICE, which also sorts raw OSErrors into exit code 4)
    _PATH_ADVICE = {
        errno.ENOTDIR: "a part of this path is a file, not a folder; choose another --out (or move that "
        "file away) and rerun",
        errno.EEXIST: "a file stands where a folder is needed; choose another --out (or move that file "
        "away) and rerun",
        errno.EISDIR: "this is a folder; give the path of a file to write in it (e.g. FOLDER/name.csv)",
    }

    @classmethod
    def from_oserror(cls, path: Path, exc: OSError) -> OutputWriteError:
        reason = exc.strerror or type(exc).__name__
        code = exc.errno or 0
        if code in cls._PATH_ADVICE:  # the path itself is wrong: a usage error (exit 2)
            return OutputPathError(
                f"could not write this file ({reason}): {cls._PATH_ADVICE[code]}", file=Path(path)
            )
        advice = cls._ADVICE.get(
            code, "fix the cause and rerun the same command (a `cytopipe run` resumes where it stopped)"
        )
        return cls(f"could not write this file ({reason}): {advice}", file=Path(path))

    @classmethod
    def for_reason(cls, path: Path, reason: str) -> OutputWriteError:
        code = cls._REASONS.get(reason, 0)
        return cls.from_oserror(path, OSError(code, reason))


class OutputPathError(OutputWriteError):
    """An output path that cannot be written as given (``--out afile.txt/x``: a file where a folder is
    needed; a folder given as the file to write): a usage error (exit code 2), not a failed write."""


class RunLockedError(StoreError):
    """Another cytopipe process is using the run folder."""


class ExecutionError(CytopipeError):
    """Work sent to the Dask cluster did not come back (its worker died, the cluster had no live
    worker for too long): the run's environment, not its input (exit code 3: rerun to resume)."""


def exit_code_for(exc: BaseException) -> int:
    """The exit code of a command that stopped with ``exc``."""
    if isinstance(exc, OutputPathError):  # the path given is wrong: choose another --out
        return EXIT_INPUT
    if isinstance(exc, OutputWriteError | RunLockedError):
        return EXIT_OUTPUT
    if isinstance(exc, ExecutionError):
        return EXIT_FAILURES
    if isinstance(exc, CytopipeError):
        return EXIT_INPUT
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, OSError) and exc.errno in OutputWriteError._ADVICE:
        return EXIT_OUTPUT
    if isinstance(exc, OSError) and exc.errno in OutputWriteError._PATH_ADVICE and exc.filename:
        return EXIT_INPUT  # e.g. a folder made under --out afile.txt/...: the path, not the disk
    return EXIT_INTERNAL


class RequestError(CytopipeError):
    """A request to ``cytopipe serve`` refused; ``status`` is the HTTP code the server answers with
    (401/403 an account or role, 404 not found, 409 a run in the way, 413 an upload too big, ...)."""

    def __init__(self, status: int, message: str, **context: Any) -> None:
        self.status = status
        super().__init__(message, **context)

    def __reduce__(self):
        return (_rebuild_request, (type(self), self.status, self.message, self.context))


def _rebuild_request(
    cls: type[RequestError], status: int, message: str, context: dict[str, Any]
) -> RequestError:
    return cls(status, message, **context)


class ServeError(CytopipeError):
    """``cytopipe serve`` cannot start (unsafe host without accounts, bad limits, database)."""


class ReviewError(CytopipeError):
    """A gate review action cannot be applied (unknown sample/population, locked run, bad gate)."""
