"""A user's `package.module:callable`, imported from the recipe's folder (model sources and the
recipe check both resolve one)."""
from __future__ import annotations

import importlib
import sys
from pathlib import Path


def resolve_ref(ref: str, folder: Path):
    """`package.module:callable` imported with `folder` (the recipe's) on sys.path."""
    mod_name, attr = ref.split(":")
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    obj = importlib.import_module(mod_name)
    for a in attr.split("."):
        obj = getattr(obj, a)
    return obj
