"""Atomic file writes: a reader (or a rerun after a kill) sees the old file or the new one, never half of one.

The temp name carries the pid and thread id, so concurrent writers of the same target never share a temp file.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_MARK = ".tmp-"


def temp_path(path: Path, suffix: str = "") -> Path:
    """A sibling temp name for ``path`` (same folder, so the final rename is atomic). ``suffix`` for writers that
    need one (Blender picks the image format from it)."""
    path = Path(path)
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}-{threading.get_ident()}{suffix}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """For writers that need a file name (PIL ``save``, a parquet writer): yields a temp sibling of ``path`` and
    renames it onto ``path`` when the block ends without an error; on an error the temp file is removed and
    ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
