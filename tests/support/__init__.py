"""Test-only helpers (readers for reference formats the package itself does not need)."""
