"""The run machinery both pair sources share (``data_prep.render``: Blender; ``data_prep.photo``: photos).

A source supplies a config (a ``RunConfig``), the settings a resume must match and a maker (``make(index) ->
(manifest entry, stats delta)``, files complete on disk when it returns); this module does the rest the same way
for both: the shared flags and their checks, pair ids and shard folders, the output folder's bookkeeping
(``RunState``: config.json, manifest.jsonl, stats.json, resume), running the maker over the pending indices on a
local pool or as Ray tasks with a progress bar, and the CLI's flags and summary line. docs/contracts.md has the
layout it writes.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as futures
import contextlib
import hashlib
import json
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from data_prep.manifest import append_entry, end_torn_line, read_manifest
from dig_common.cli import CliError
from dig_common.crashpoints import crash_point
from dig_common.fileio import TMP_MARK, atomic_write_text

# ---------------------------------------------------------------------------------------------- seeds and K


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple of values, stable across Python versions and processes."""
    digest = hashlib.sha256(repr(tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def parse_k(k: int | str, what: str = "--k") -> tuple[int, int]:
    """'3' -> (3, 3); '1-4' -> (1, 4): the one reading of a K spec (CLI flags and the stages file). Raises
    ValueError naming ``what``. K = 0 pairs come from no_diff_fraction, not from a K spec."""
    text = str(k).strip()
    try:
        lo, hi = (int(v) for v in text.split("-", 1)) if "-" in text else (int(text), int(text))
    except ValueError:
        raise ValueError(f"{what}: expected an integer or a range like '1-4', got {k!r}") from None
    if lo < 1 or hi < lo:
        raise ValueError(
            f"{what}: expected 1 <= low <= high, got {k!r} (K = 0 pairs come from --no-diff-fraction, or a stage's no_diff_fraction)"
        )
    return lo, hi


# What an interrupted generator says (dig_common.cli): run_local commits every finished pair before stopping
RESUME_HINT = "every finished pair is kept (listed in <out-dir>/manifest.jsonl); rerun the same command to resume"

STATS = "stats.json"
CONFIG = "config.json"
SUMMARY_KEYS = ("accepted", "candidates", "rejected", "acceptance_rate", "this_run")  # the CLI's one output line

Result = tuple[dict, dict]  # (manifest entry, stats delta) of one finished pair


class GateError(ValueError):
    """No candidate of a pair passed the gates: the settings ask for what these inputs cannot give (a --k too
    large, gates too strict). Bad input, so one ``prog: error:`` line naming the pair and the fix, exit 2."""


@dataclass(kw_only=True)
class RunConfig:
    """What every pair source's run has: how many pairs, their K, seed, size, workers, shard and Ray cluster."""

    out: Path
    num: int
    k: int | str = "1"
    seed: int = 0
    # the image size of every pair source: the one home of the 480x320 default (build, the CLIs, the stages file)
    width: int = 480
    height: int = 320
    workers: int = 1
    no_diff_fraction: float = 0.0
    shard: tuple[int, int] = (0, 1)
    ray_address: str | None = None
    progress: bool = True

    ID_PREFIX: ClassVar[str] = "s"  # pair ids: <prefix><seed>-<index:07d>
    MIN_SIZE: ClassVar[int] = 16  # smallest --width / --height

    def validate(self) -> None:
        """Raise ValueError naming the bad flag, before anything is read or written."""
        if not isinstance(self.num, int) or self.num < 1:
            raise ValueError(f"--num: expected an integer >= 1 (the pairs of the whole run), got {self.num!r}")
        parse_k(self.k)
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"--seed: expected an integer >= 0, got {self.seed!r}")
        for name in ("width", "height"):
            v = getattr(self, name)
            if not isinstance(v, int) or not self.MIN_SIZE <= v <= 8192:
                raise ValueError(f"--{name}: expected an integer in [{self.MIN_SIZE}, 8192], got {v!r}")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise ValueError(f"--workers: expected an integer >= 1, got {self.workers!r}")
        if not 0.0 <= float(self.no_diff_fraction) <= 1.0:
            raise ValueError(f"--no-diff-fraction: expected a number in [0, 1], got {self.no_diff_fraction!r}")
        i, n = self.shard
        if not (isinstance(i, int) and isinstance(n, int) and n >= 1 and 0 <= i < n):
            raise ValueError(f"--shard: expected i/N with 0 <= i < N, got {i}/{n}")
        if Path(self.out).exists() and not Path(self.out).is_dir():
            raise CliError(f"--out-dir: {self.out} is a file; give a folder (new, or a run to resume)")

    def render_settings(self) -> dict:
        """The image settings stats.json records (each source says what makes its images)."""
        raise NotImplementedError

    def pair_id(self, index: int) -> str:
        return pair_id(self.seed, index, self.ID_PREFIX)

    @property
    def shard_dir(self) -> Path:
        return Path(self.out) / shard_folder(self.shard)


def pair_id(seed: int, index: int, prefix: str = "s") -> str:
    """Deterministic from (seed, index): reruns and shards never collide (``s``: rendered, ``p``: photo)."""
    return f"{prefix}{seed}-{index:07d}"


def shard_folder(shard: tuple[int, int]) -> str:
    return f"shard-{shard[0]:03d}-of-{shard[1]:03d}"


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard: expected i/N such as 0/4, got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard: expected i/N with 0 <= i < N, got {text!r}")
    return i, n


def plan_k(cfg: RunConfig, index: int) -> int:
    """Number of differences of pair `index`: fixed per index so that rejections never change K."""
    rng = random.Random(derive_seed("k", cfg.seed, index))
    if rng.random() < float(cfg.no_diff_fraction):
        return 0
    lo, hi = parse_k(cfg.k)
    return rng.randint(lo, hi)


def new_delta() -> dict:
    """The stats delta a maker fills for one pair: candidates tried, rejections by reason, CPU seconds."""
    return {"candidates": 0, "rejected": collections.Counter(), "render_cpu_s": 0.0}


# ------------------------------------------------------------------------------------- output directory


def _empty_stats(**extra) -> dict:
    return {
        "accepted": 0,
        "candidates": 0,
        "rejected": collections.Counter(),
        "render_cpu_s": 0.0,
        "differences_by_type": collections.Counter(),
        **extra,
    }


class RunState:
    """Manifest, stats and resume bookkeeping of one shard in one output directory.

    ``resume``: the settings a rerun into this folder must repeat (written to config.json by the first run);
    ``added_later``: keys older runs did not record, with the value their absence stands for.
    """

    def __init__(self, cfg: RunConfig, resume: dict, added_later: dict | None = None):
        self.cfg, self.out = cfg, Path(cfg.out)
        self.shard_dir = cfg.shard_dir
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self._check_config(resume, added_later or {})
        self.lock = threading.Lock()
        for stale in self.shard_dir.glob(f"*{TMP_MARK}*"):  # leftovers of a killed run
            stale.unlink(missing_ok=True)
        manifest = read_manifest(self.out, required=False)
        end_torn_line(self.out)
        # a pair counts as made only with all its files: one listed whose record or an image was lost is made again
        self.done = {e.pair_id for e in manifest.entries if manifest.complete(e)}
        self.stats = self._read_stats()
        self.stats["renderer_settings"] = cfg.render_settings()
        self._recount([e for e in manifest.entries if e.json.startswith(f"{self.shard_dir.name}/")])

    def _check_config(self, want: dict, added_later: dict) -> None:
        """config.json binds a folder to its settings once it holds a pair: a folder where no pair was finished
        (a first run refused at its first pair, e.g. --k too large) takes the new settings."""
        path = self.out / CONFIG
        if not path.exists():
            atomic_write_text(path, json.dumps(want, indent=1))
            return
        have = {**added_later, **json.loads(path.read_text())}
        diff = [key for key in want if have.get(key) != want[key]]
        if diff and not read_manifest(self.out, required=False).entries:
            atomic_write_text(path, json.dumps(want, indent=1))
            return
        if diff:
            changes = ", ".join(f"{d}: {have.get(d)!r} -> {want[d]!r}" for d in diff)
            raise ValueError(
                f"{self.out} holds a run with different settings ({changes}); "
                "use a new --out-dir or the same settings to resume"
            )

    def _recount(self, listed: list) -> None:
        """Make this shard's stats count every pair its manifest lists (``listed``, in file order).

        ``commit`` appends the manifest line, then rewrites stats.json: a run killed between the two leaves a
        pair listed but not counted. stats.json names the pairs it counted (``counted``; a run from before that
        key counted the first ``accepted`` lines); a listed, complete pair missing there is counted now, its
        accepted candidate and change types (its rejections and CPU time died with the run: ``recounted``)."""
        st = self.stats
        counted = st.get("counted")
        if counted is None:
            counted = [e.pair_id for e in listed[: st["accepted"]]]
        known = set(counted)
        missed = [e for e in listed if e.pair_id not in known and e.pair_id in self.done]
        for e in missed:
            st["accepted"] += 1
            st["candidates"] += 1
            st["differences_by_type"].update(e.types or ())
            counted.append(e.pair_id)
        st["counted"] = counted
        self.counted = set(counted)
        if missed:
            st["recounted"] = st.get("recounted", 0) + len(missed)
            with self.lock:
                self._write_stats()

    def _read_stats(self) -> dict:
        path = self.shard_dir / STATS
        if path.exists():
            with contextlib.suppress(json.JSONDecodeError):
                st = json.loads(path.read_text())
                st["rejected"] = collections.Counter(st.get("rejected", {}))
                st["differences_by_type"] = collections.Counter(st.get("differences_by_type", {}))
                return st
        return _empty_stats(shard=list(self.cfg.shard))

    def todo(self) -> list[int]:
        i, n = self.cfg.shard
        return [j for j in range(self.cfg.num) if j % n == i and self.cfg.pair_id(j) not in self.done]

    def commit(self, record: dict, delta: dict) -> None:
        """Append the finished pair to the manifest (one O_APPEND write), then rewrite the stats. A kill between
        the two leaves the pair listed but not counted: the next run's ``_recount`` counts it. A pair counted
        before (its files were lost, so it was made again) adds its new work but is not accepted twice."""
        pid = record["pair_id"]
        with self.lock:
            if pid in self.done:
                return
            append_entry(self.out, record)
            self.done.add(pid)
            crash_point("pair-listed")
            st = self.stats
            if pid not in self.counted:
                self.counted.add(pid)
                st["counted"].append(pid)
                st["accepted"] += 1
                st["differences_by_type"].update(record["types"])
            st["candidates"] += delta["candidates"]
            st["rejected"].update(delta["rejected"])
            st["render_cpu_s"] = round(st["render_cpu_s"] + delta["render_cpu_s"], 3)
            st["peak_rss_mb_per_worker"] = round(
                max(st.get("peak_rss_mb_per_worker", 0.0), delta.get("peak_rss_mb", 0.0)), 1
            )
            self._write_stats()
        crash_point("pair-committed")

    def _write_stats(self) -> None:
        st = dict(
            self.stats,
            rejected=dict(self.stats["rejected"]),
            differences_by_type=dict(self.stats["differences_by_type"]),
        )
        atomic_write_text(self.shard_dir / STATS, json.dumps(st, indent=1))
        # Top-level stats: the sum over every shard folder of this output directory.
        total = _empty_stats(shards=[])
        for p in sorted(self.out.glob(f"shard-*/{STATS}")):
            with contextlib.suppress(json.JSONDecodeError, OSError):
                s = json.loads(p.read_text())
                for key in ("accepted", "candidates", "render_cpu_s", "recounted"):
                    total[key] = total.get(key, 0) + s.get(key, 0)
                total["rejected"].update(s.get("rejected", {}))
                total["differences_by_type"].update(s.get("differences_by_type", {}))
                total["shards"].append(p.parent.name)
                total["peak_rss_mb_per_worker"] = max(
                    total.get("peak_rss_mb_per_worker", 0.0), s.get("peak_rss_mb_per_worker", 0.0)
                )
        if not total["recounted"]:
            del total["recounted"]
        total["rejected_total"] = sum(total["rejected"].values())
        total["acceptance_rate"] = round(total["accepted"] / total["candidates"], 4) if total["candidates"] else None
        total["renderer_settings"] = self.stats["renderer_settings"]
        total["render_cpu_s"] = round(total["render_cpu_s"], 3)
        total["rejected"], total["differences_by_type"] = dict(total["rejected"]), dict(total["differences_by_type"])
        atomic_write_text(self.out / STATS, json.dumps(total, indent=1))

    def summary(self) -> dict:
        with self.lock:
            self._write_stats()
        return json.loads((self.out / STATS).read_text())


# ------------------------------------------------------------------------------------------------ drivers


def progress_bar(cfg: RunConfig, total: int):
    if not cfg.progress:
        return contextlib.nullcontext(None)
    from tqdm import tqdm

    return tqdm(total=total, unit="pair", desc=f"pairs {shard_folder(cfg.shard)}", dynamic_ncols=True)


def _commit(state: RunState, bar, results: Iterable[Result]) -> None:
    for record, delta in results:
        state.commit(record, delta)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(rejected=sum(state.stats["rejected"].values()), refresh=False)


def run(state: RunState, local: Callable[[list[int]], None], ray: Callable[[list[int]], None]) -> dict:
    """Make the shard's pending pairs (``ray`` with --ray-address, else ``local``); the stats, with this run's."""
    todo = state.todo()
    t0 = time.perf_counter()
    if todo:
        (ray if state.cfg.ray_address else local)(todo)
    stats = state.summary()
    stats["this_run"] = {"pairs": len(todo), "wall_s": round(time.perf_counter() - t0, 2)}
    return stats


def run_local(
    state: RunState,
    todo: list[int],
    make: Callable[[int], Result],
    pool: futures.Executor | None,
    stop: Callable[[], None] | None = None,
) -> None:
    """``make(index)`` for every pending index on ``pool`` (in this thread when None), each pair committed as it
    finishes. The first error stops the run: nothing new starts, the pairs already being made are finished and
    committed, then the error is raised (it names the pair). An interrupt (Ctrl-C, SIGINT) stops it at once:
    queued pairs never start, ``stop()`` ends the ones being made (the render workers), and every pair that
    finished, before or while stopping, is committed before the interrupt goes on (rerun to resume)."""
    with progress_bar(state.cfg, len(todo)) as bar:
        if pool is None:
            for index in todo:
                _commit(state, bar, [make(index)])
            return
        window = 4 * state.cfg.workers  # queued ahead: no worker waits, and an error leaves little to cancel
        pending: set[futures.Future] = set()
        queue = iter(todo)
        error: BaseException | None = None
        try:
            while True:
                while error is None and len(pending) < window and (index := next(queue, None)) is not None:
                    pending.add(pool.submit(make, index))
                if not pending:
                    break
                done, _ = futures.wait(pending, return_when=futures.FIRST_COMPLETED)
                for fut in done:  # leaves ``pending`` only once committed: an interrupt here loses nothing
                    if fut.cancelled():
                        pass
                    elif fut.exception() is None:
                        _commit(state, bar, [fut.result()])
                    elif error is None:
                        error = fut.exception()
                        for other in pending:
                            other.cancel()
                    pending.discard(fut)
        except BaseException:  # Ctrl-C: what has not started never will; what finished is kept
            for fut in pending:
                fut.cancel()
            if stop is not None:
                stop()
            finished, _ = futures.wait(pending)  # quick: the rest were cancelled or stopped
            for fut in finished:
                if not fut.cancelled() and fut.exception() is None:
                    _commit(state, bar, [fut.result()])
            raise
        if error is not None:
            raise error


def run_ray(state: RunState, todo: list[int], task: Callable, args: tuple, cpus_per_task: int, chunk: int) -> None:
    """``task(*args, indices)`` -> [Result, ...] as Ray tasks of ``chunk`` indices each, committed by this driver.

    ``--ray-address local`` starts a fresh local cluster sized for ``--workers`` tasks; any other address joins a
    cluster. A connection this function opened (a local cluster included) is shut down when it returns.
    """
    import ray

    cfg = state.cfg
    started_here = not ray.is_initialized()
    if started_here:
        if cfg.ray_address == "local":
            num_cpus = cfg.workers * cpus_per_task
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=cfg.ray_address, log_to_driver=False)
    try:
        remote = ray.remote(num_cpus=cpus_per_task, max_retries=2)(task)
        pending = [remote.remote(*args, todo[i : i + chunk]) for i in range(0, len(todo), chunk)]
        with progress_bar(cfg, len(todo)) as bar:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                _commit(state, bar, ray.get(ready[0]))
    finally:
        if started_here:
            ray.shutdown()


# -------------------------------------------------------------------------------------------------- CLI


def add_run_flags(parser: argparse.ArgumentParser, workers: str) -> None:
    """The flags every pair source has (docs/cli.md); ``workers`` says what a worker is."""
    p = parser
    p.add_argument("--num", type=int, required=True, help="number of pairs of the whole run (all shards)")
    p.add_argument("--k", default="1", help="differences per pair: an integer or a uniform range like 1-4 (default 1)")
    p.add_argument("--seed", type=int, default=0, help="run seed; pair ids and content derive from (seed, index)")
    p.add_argument("--out-dir", type=Path, required=True, help="output folder (created; a rerun resumes)")
    p.add_argument("--width", type=int, default=RunConfig.width, help=f"default {RunConfig.width}")
    p.add_argument("--height", type=int, default=RunConfig.height, help=f"default {RunConfig.height}")
    p.add_argument("--workers", type=int, default=1, help=f"{workers} (or concurrent Ray tasks)")
    p.add_argument("--shard", default="0/1", help="i/N: make only pairs with index %% N == i (default 0/1)")
    p.add_argument("--no-diff-fraction", type=float, default=0.0, help="fraction of pairs with zero differences")
    p.add_argument("--ray-address", default=None, help="Ray cluster address ('auto', 'ray://...') or 'local'")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_flags(args: argparse.Namespace) -> dict:
    """The RunConfig fields of the flags ``add_run_flags`` added."""
    return dict(
        out=args.out_dir,
        num=args.num,
        k=args.k,
        seed=args.seed,
        width=args.width,
        height=args.height,
        workers=args.workers,
        no_diff_fraction=args.no_diff_fraction,
        shard=parse_shard(args.shard),
        ray_address=args.ray_address,
        progress=not args.no_progress,
    )


def print_summary(stats: dict) -> None:
    print(json.dumps({k: stats[k] for k in SUMMARY_KEYS}))
