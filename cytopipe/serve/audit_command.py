"""``cytopipe audit verify|export``: check the workspace's hash-chained audit trail (exit 3 and the
first broken entry when a row was edited or deleted) or export it as escaped CSV or JSON."""

from cytopipe.serve.review_command import add_audit_arguments as add_arguments
from cytopipe.serve.review_command import run_audit as run

__all__ = ["add_arguments", "run"]
