"""dig_common.fileio: a write that fails or is killed half way leaves the old file, whole."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dig_common.fileio import TMP_MARK, atomic_output, atomic_write_text

REPO = Path(__file__).resolve().parents[1]
OLD = '{"accepted": 10}\n'


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if TMP_MARK in p.name)


def test_a_write_that_raises_half_way_keeps_the_old_file(tmp_path):
    target = tmp_path / "stats.json"
    target.write_text(OLD)
    with pytest.raises(RuntimeError, match="disk full"), atomic_output(target) as tmp, open(tmp, "w") as handle:
        handle.write('{"accepted": 1')  # half of the new content is on disk
        handle.flush()
        raise RuntimeError("disk full")
    assert target.read_text() == OLD
    assert leftovers(tmp_path) == []  # the half-written temp file is gone too


def test_a_parquet_writer_that_fails_between_row_groups_keeps_the_old_parquet(tmp_path):
    target = tmp_path / "train.parquet"
    pq.write_table(pa.table({"x": [1, 2, 3]}), target)
    schema = pa.schema([("x", pa.int64())])
    with pytest.raises(ValueError, match="bad row"), atomic_output(target) as tmp, pq.ParquetWriter(tmp, schema) as w:
        w.write_table(pa.table({"x": [7, 8]}))  # one row group written
        raise ValueError("bad row")
    assert pq.read_table(target).column("x").to_pylist() == [1, 2, 3]
    assert leftovers(tmp_path) == []


KILLED_WRITER = """
import os, signal, sys
from pathlib import Path
from dig_common.fileio import atomic_output
with atomic_output(Path(sys.argv[1])) as tmp:
    with open(tmp, "w") as handle:
        handle.write('{"accepted": 1')
        handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)  # killed with half the new file written, before the rename
"""


def test_a_writer_killed_half_way_keeps_the_old_file_and_a_rerun_replaces_it(tmp_path):
    target = tmp_path / "stats.json"
    target.write_text(OLD)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(target)], env=env, timeout=60)
    assert proc.returncode == -9
    assert target.read_text() == OLD
    assert len(leftovers(tmp_path)) == 1  # the temp file a kill leaves: never read as the target
    atomic_write_text(target, '{"accepted": 11}\n')
    assert target.read_text() == '{"accepted": 11}\n'
