"""Atomic file writes: a reader (or a rerun after a kill) sees the old file or the new one, never half of one.

The temp name carries the pid and thread id, so concurrent writers of the same target never share a temp file.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

TMP_MARK = ".tmp-"


def temp_path(path: Path) -> Path:
    """A sibling temp name for ``path`` (same folder, so the final rename is atomic)."""
    path = Path(path)
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}-{threading.get_ident()}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())
