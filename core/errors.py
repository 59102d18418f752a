"""Errors a user can fix. The CLI prints them as one paragraph and exits 2, with no traceback."""
from __future__ import annotations


class RecipeError(Exception):
    """A recipe or a command-line argument is invalid; raised before any work is done."""


def field_error(where: str, field: str, problem: str, *, value=None, accepted=None) -> RecipeError:
    """Build the one-paragraph message: file, field path, bad value, what is accepted."""
    parts = [f"{where}: field '{field}'" if field else where]
    text = f"{parts[0]}: {problem}"
    if value is not None:
        text += f" (got {value!r})"
    if accepted:
        if isinstance(accepted, (list, tuple, set)):
            accepted = ", ".join(repr(a) for a in accepted)
        text += f". Accepted: {accepted}"
    return RecipeError(text.rstrip(".") + ".")
