"""The per-user cache for things made once and reused by every run (trained built-in models,
extracted corpora). Override the folder with WORKBENCH_CACHE."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    d = Path(os.environ.get("WORKBENCH_CACHE", Path.home() / ".cache" / "model-workbench"))
    d.mkdir(parents=True, exist_ok=True)
    return d
