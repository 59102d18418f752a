"""Errors a user can fix. The CLI prints them as one paragraph and exits 2, with no traceback."""
from __future__ import annotations

import re


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


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def one_line(e: BaseException, limit: int = 500) -> str:
    """The exception as one line: its type and first line, terminal colour codes dropped. Where that line only
    announces a failure (torch.onnx: "Failed to export the model with torch.export. This is step 1/3 ... Next
    steps:"), the cause it summarises ("## Exception summary") or chains is added."""
    lines = [ln.strip() for ln in _ANSI.sub("", str(e)).strip().splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    if "## Exception summary" in lines:
        after = lines[lines.index("## Exception summary") + 1:]
        if after:
            text += f" Cause: {after[0]}"
    elif e.__cause__ is not None and text.endswith(":"):
        text += f" {one_line(e.__cause__, limit)}"
    return f"{type(e).__name__}: {text}"[:limit]
