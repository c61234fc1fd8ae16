"""Errors a user can cause and fix.

Every exception raised for bad input (recipe, JSONL line, checkpoint, layout) is a
``UserError``. The CLI prints it as one line and exits with code 2, never a traceback.
The message names where the problem is (file, line, field) and what to do about it.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input that the user can fix. ``str(err)`` is the full one-line message."""

    def __init__(self, message: str, *, where: str | None = None, fix: str | None = None):
        self.where = where
        self.fix = fix
        parts = []
        if where:
            parts.append(f"{where}: ")
        parts.append(message)
        if fix:
            parts.append(f" (fix: {fix})")
        super().__init__("".join(parts))


class DataError(UserError):
    """A malformed record in a JSONL/data file."""


class RecipeError(UserError):
    """A recipe that fails validation."""


class LayoutError(UserError):
    """An impossible parallel layout (TP/PP/DP against the model shape or world size)."""


class CheckpointError(UserError):
    """A checkpoint that is missing, partial or from another architecture."""
