"""data_prep.manifest: the one reader and writer of a pair set's manifest.jsonl."""

from __future__ import annotations

import json

import pytest

from data_prep import manifest as M


def entry(pair_id: str, index: int, k: int = 1) -> dict:
    return {
        "pair_id": pair_id,
        "json": f"shard_0000/{pair_id}.json",
        "num_differences": k,
        "types": ["color"] * k,
        "index": index,
    }


def test_append_then_read_keeps_file_order_and_fields(tmp_path):
    for pid, index in (("b", 1), ("a", 0)):
        M.append_entry(tmp_path, entry(pid, index, k=2))
    manifest = M.read_manifest(tmp_path)
    assert [e.pair_id for e in manifest.entries] == ["b", "a"]
    first = manifest.entries[0]
    assert (first.num_differences, first.types, first.index) == (2, ("color", "color"), 1)
    assert manifest.record_path(first) == tmp_path / "shard_0000" / "b.json"
    assert manifest.torn == 0


def test_torn_lines_are_skipped_and_counted_and_the_tail_is_ended(tmp_path):
    path = tmp_path / M.MANIFEST
    path.write_text(json.dumps(entry("a", 0)) + "\n" + '{"pair_id": "b", "js')  # killed mid-write
    manifest = M.read_manifest(tmp_path)
    assert [e.pair_id for e in manifest.entries] == ["a"] and manifest.torn == 1
    M.end_torn_line(tmp_path)
    M.append_entry(tmp_path, entry("b", 1))
    manifest = M.read_manifest(tmp_path)
    assert [e.pair_id for e in manifest.entries] == ["a", "b"] and manifest.torn == 1
    M.end_torn_line(tmp_path)  # a complete file is left alone
    assert path.read_text().count("\n") == 3


def test_a_pair_listed_twice_appears_once_unless_the_records_differ(tmp_path):
    M.append_entry(tmp_path, entry("a", 0))
    M.append_entry(tmp_path, entry("a", 0))  # a rerun racing a finished worker: same record
    assert [e.pair_id for e in M.read_manifest(tmp_path).entries] == ["a"]
    M.append_entry(tmp_path, {**entry("a", 0), "json": "shard_0001/a.json"})
    with pytest.raises(ValueError, match=r"manifest.jsonl:3: pair a listed twice"):
        M.read_manifest(tmp_path)


@pytest.mark.parametrize(
    "line", ['{"json": "x.json"}', '{"pair_id": "a"}', "[1, 2]", '{"pair_id": "a", "json": "x", "index": "two"}']
)
def test_a_damaged_json_line_is_an_error_naming_file_and_line(tmp_path, line):
    (tmp_path / M.MANIFEST).write_text(json.dumps(entry("a", 0)) + "\n" + line + "\n")
    with pytest.raises(ValueError, match=r"manifest.jsonl:2: damaged manifest line"):
        M.read_manifest(tmp_path)


def test_missing_manifest(tmp_path):
    with pytest.raises(FileNotFoundError, match="--pairs must be the output folder of a generation run"):
        M.read_manifest(tmp_path)
    empty = M.read_manifest(tmp_path, required=False)
    assert empty.entries == () and empty.torn == 0
