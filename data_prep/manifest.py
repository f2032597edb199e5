"""The manifest of a pair set, its one reader and writer (docs/contracts.md, pair record).

``<pairs_dir>/manifest.jsonl`` holds one JSON line per finished pair, appended (one ``O_APPEND`` write) only
after the pair's files are complete. A line that is not JSON is a write torn by a killed run: the generator
makes that pair again and appends a complete line, so readers skip torn lines and count them. A JSON line
without ``pair_id`` and ``json`` is not torn but damaged, and is an error naming the file and line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.jsonl"


@dataclass(frozen=True)
class ManifestEntry:
    pair_id: str
    json: str  # the pair record, relative to the pair set's folder
    num_differences: int | None
    types: tuple[str, ...] | None
    index: int | None  # the generator index of the pair (runs made before it was recorded have none)
    images: tuple[str, ...] = ()  # image_a, image_b, relative like ``json`` (lines that list them)


@dataclass(frozen=True)
class Manifest:
    path: Path
    entries: tuple[ManifestEntry, ...]  # file order; a pair listed twice (same record) appears once
    torn: int  # lines skipped as torn writes

    def record_path(self, entry: ManifestEntry) -> Path:
        return self.path.parent / entry.json

    def complete(self, entry: ManifestEntry) -> bool:
        """The pair's files are all on disk: its record and the images its line lists (a resume trusts no less)."""
        return all((self.path.parent / name).is_file() for name in (entry.json, *entry.images))


def manifest_path(pairs_dir: Path) -> Path:
    return Path(pairs_dir) / MANIFEST


def read_manifest(pairs_dir: Path, required: bool = True) -> Manifest:
    """The entries of a pair set's manifest. A missing manifest is an error if ``required``, else empty."""
    path = manifest_path(pairs_dir)
    if not path.is_file():
        if required:
            raise FileNotFoundError(f"{path} not found: --pairs must be the output folder of a generation run")
        return Manifest(path, (), 0)
    entries: dict[str, ManifestEntry] = {}
    torn = 0
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError:
                torn += 1
                continue
            try:
                entry = _entry(raw)
            except (KeyError, TypeError, ValueError) as err:
                raise ValueError(f"{path}:{number}: damaged manifest line ({err!r}): {line.strip()[:200]}") from err
            known = entries.get(entry.pair_id)
            if known is not None and known.json != entry.json:
                raise ValueError(f"{path}:{number}: pair {entry.pair_id} listed twice with different records")
            entries.setdefault(entry.pair_id, entry)
    return Manifest(path, tuple(entries.values()), torn)


def _entry(raw: object) -> ManifestEntry:
    if not isinstance(raw, dict):
        raise TypeError("not a JSON object")
    k, types, index = raw.get("num_differences"), raw.get("types"), raw.get("index")
    return ManifestEntry(
        pair_id=str(raw["pair_id"]),
        json=str(raw["json"]),
        num_differences=None if k is None else int(k),
        types=None if types is None else tuple(str(t) for t in types),
        index=None if index is None else int(index),
        images=tuple(str(raw[key]) for key in ("image_a", "image_b") if raw.get(key)),
    )


def end_torn_line(pairs_dir: Path) -> None:
    """If a killed run left the last line unfinished, end it so that the next append starts a line of its own."""
    path = manifest_path(pairs_dir)
    if path.is_file() and path.stat().st_size:
        with path.open("rb") as f:
            f.seek(-1, os.SEEK_END)
            complete = f.read(1) == b"\n"
        if not complete:
            with path.open("ab") as f:
                f.write(b"\n")


def manifest_entry(shard_dir: Path, pid: str, index: int, differences: list[dict]) -> dict:
    """The manifest line of one finished pair (docs/contracts.md)."""
    return {
        "pair_id": pid,
        "json": f"{shard_dir.name}/{pid}.json",
        "image_a": f"{shard_dir.name}/{pid}_a.png",
        "image_b": f"{shard_dir.name}/{pid}_b.png",
        "num_differences": len(differences),
        "types": [d["type"] for d in differences],
        "index": index,
    }


def append_entry(pairs_dir: Path, record: dict) -> None:
    """Append one finished pair: a single ``O_APPEND`` write, so concurrent writers never interleave a line."""
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(manifest_path(pairs_dir), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
