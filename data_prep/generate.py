"""Generate DiG image pairs with Blender: ``python -m data_prep.generate --num 100 --k 1-4 --out data/pairs``.

Runs in the main venv and drives long-lived render workers (``data_prep/render_worker.py``) in the render
venv as subprocesses (``DIG_RENDER_PYTHON``, default ``<repo>/.venv-render/bin/python``), locally with
threads or as Ray tasks (``--ray-address``). Output per docs/contracts.md, pair record: ``<out>/manifest.jsonl``,
``<out>/stats.json``, ``<out>/<shard folder>/<pair_id>_a.png|_b.png|.json``; atomic writes; reruns resume.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import queue
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep import scene as S
from data_prep.manifest import append_entry, end_torn_line, read_manifest
from data_prep.stages import check_difficulty_filters, difficulty_failure
from dig_common.fileio import TMP_MARK, atomic_write_text, temp_path

REPO_ROOT = Path(__file__).resolve().parent.parent
WORKER_SCRIPT = Path(__file__).resolve().with_name("render_worker.py")
STATS = "stats.json"
CONFIG = "config.json"

# Measured on the 2-core machine (docs/generation.md): 16 spp + OIDN on the colour pass only
# (albedo/normal passes left noisy speckle on metals at 16 spp; BALANCED: +0.5 dB PSNR over FAST at the
# same cost), reduced bounces, no light tree, and a mask pre-pass (-35 % CPU per pair at ~40 % rejections).
RENDER_DEFAULTS = {
    "max_bounces": 2,
    "diffuse_bounces": 1,
    "glossy_bounces": 1,
    "light_tree": False,
    "denoising_prefilter": "FAST",
    "denoising_quality": "BALANCED",
    "denoising_input_passes": "RGB",
    "mask_prepass": True,  # 1-spp mask renders apply the visibility gates before the expensive renders
}
# Settings that must match when a run resumes into an existing output directory.
RESUME_KEYS = (
    "seed",
    "k",
    "width",
    "height",
    "samples",
    "denoise",
    "no_diff_fraction",
    "render_overrides",
    "change_weights",
    "vocab_sha",
    "difficulty_filters",
)


class RenderEnvError(RuntimeError):
    """The render venv is missing or broken."""


class RenderWorkerError(RuntimeError):
    """A render worker died or answered with an error."""


class RenderDeviceError(ValueError):
    """The requested Cycles device is not present (raised before any rendering)."""


DEVICES = ("cpu", "cuda", "optix", "hip", "auto")  # --device; checked again by the render worker


def validate_run_flags(config, min_size: int) -> None:
    """The flags every pair source shares (num, k, seed, width/height, workers, no-diff fraction, shard): a
    ValueError naming the bad flag, before anything is read or written."""
    if not isinstance(config.num, int) or config.num < 0:
        raise ValueError(f"--num: expected an integer >= 0, got {config.num!r}")
    S.parse_k(config.k)
    if not isinstance(config.seed, int) or config.seed < 0:
        raise ValueError(f"--seed: expected an integer >= 0, got {config.seed!r}")
    for name in ("width", "height"):
        v = getattr(config, name)
        if not isinstance(v, int) or not min_size <= v <= 8192:
            raise ValueError(f"--{name}: expected an integer in [{min_size}, 8192], got {v!r}")
    if not isinstance(config.workers, int) or config.workers < 1:
        raise ValueError(f"--workers: expected an integer >= 1, got {config.workers!r}")
    if not 0.0 <= float(config.no_diff_fraction) <= 1.0:
        raise ValueError(f"--no-diff-fraction: expected a number in [0, 1], got {config.no_diff_fraction!r}")
    i, n = config.shard
    if not (isinstance(i, int) and isinstance(n, int) and n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard: expected i/N with 0 <= i < N, got {i}/{n}")


@dataclass
class GenerateConfig:
    out: Path
    num: int
    k: int | str = "1"
    seed: int = 0
    width: int = 480
    height: int = 320
    samples: int = 16
    workers: int = 1
    threads: int | None = None  # per worker; default: CPU cores / workers
    no_diff_fraction: float = 0.0
    shard: tuple[int, int] = (0, 1)
    vocab: Path | str | None = None
    ray_address: str | None = None
    progress: bool = True
    denoise: bool = True
    render_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"denoising_quality": "HIGH"}
    change_weights: dict[str, float] | None = None  # overrides the vocabulary's `changes`
    save_masks: bool = False  # also write <pair_id>_mask_a.npy / _mask_b.npy (Object Index pass)
    difficulty_filters: dict[str, float] = field(default_factory=dict)  # stages.DIFFICULTY_FILTERS; {} = off
    device: str = "cpu"  # Cycles device: cpu | cuda | optix | hip | auto (the best GPU backend found, else cpu)

    def validate(self) -> None:
        """Raise ValueError naming the bad flag, before any expensive work."""
        validate_run_flags(self, min_size=16)
        if not isinstance(self.samples, int) or not 1 <= self.samples <= 65536:
            raise ValueError(f"--samples: expected an integer in [1, 65536], got {self.samples!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ValueError(f"--threads: expected an integer >= 1, got {self.threads!r}")
        self.difficulty_filters = check_difficulty_filters(self.difficulty_filters, "--difficulty")
        if self.device not in DEVICES:
            raise ValueError(f"--device: expected one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.change_weights is not None:
            bad = set(self.change_weights) - set(S.CHANGE_TYPES)
            if bad:
                raise ValueError(f"change_weights: unknown change type(s) {sorted(bad)}; known: {S.CHANGE_TYPES}")

    @property
    def threads_per_worker(self) -> int:
        return self.threads or max(1, (os.cpu_count() or 1) // self.workers)

    def render_settings(self) -> dict:
        return {**RENDER_DEFAULTS, "width": self.width, "height": self.height, "samples": self.samples,
                "denoise": self.denoise, "threads": self.threads_per_worker, **self.render_overrides}  # fmt: skip


def parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(v) for v in str(text).split("/"))
    except ValueError:
        raise ValueError(f"--shard: expected i/N such as 0/4, got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"--shard: expected i/N with 0 <= i < N, got {text!r}")
    return i, n


def parse_filters(text: str) -> dict[str, float]:
    """'min_visible_px=800,max_occluded_fraction=0.5' -> {...}; checked by GenerateConfig.validate."""
    out = {}
    for item in filter(None, (t.strip() for t in str(text).split(","))):
        key, sep, value = item.partition("=")
        try:
            out[key.strip()] = float(value) if sep else None
        except ValueError:
            raise ValueError(f"--difficulty: expected KEY=NUMBER, got {item!r}") from None
    return out


def pair_id(seed: int, index: int) -> str:
    """Deterministic from (seed, index): reruns and shards never collide."""
    return f"s{seed}-{index:07d}"


def shard_folder(shard: tuple[int, int]) -> str:
    return f"shard-{shard[0]:03d}-of-{shard[1]:03d}"


# ------------------------------------------------------------------------------------------ render worker


def render_python() -> Path:
    """Interpreter of the render venv; a clear error if it is missing."""
    env = os.environ.get("DIG_RENDER_PYTHON")
    path = Path(env) if env else REPO_ROOT / ".venv-render" / "bin" / "python"
    if not path.exists():
        src = "DIG_RENDER_PYTHON" if env else "the default render venv"
        raise RenderEnvError(
            f"render Python not found at {path} ({src}). Build the Blender venv with `bash scripts/setup_env.sh` "
            "or point DIG_RENDER_PYTHON at a Python 3.11 that has bpy==5.0.1, numpy<2 and OpenEXR."
        )
    return path


class RenderWorker:
    """Client of one long-lived render worker subprocess (JSON lines over stdin/stdout)."""

    def __init__(self, python: Path | str | None = None):
        self.python = str(python or render_python())
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=60)
        self.proc = subprocess.Popen(
            [self.python, "-u", str(WORKER_SCRIPT)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
            env={**os.environ, "DIG_RENDER_PARENT_PID": str(os.getpid())},  # the worker dies with us
        )  # fmt: skip
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()
        self._next_id = 0

    def _read_stderr(self):
        for line in self.proc.stderr:
            self.stderr_tail.append(line.rstrip())

    def request(self, job: dict) -> dict:
        self._next_id += 1
        job = dict(job, id=self._next_id)
        try:
            self.proc.stdin.write(json.dumps(job) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            self.proc.wait(timeout=10)
            tail = "\n".join(list(self.stderr_tail)[-25:])
            raise RenderWorkerError(f"render worker ({self.python}) exited with code {self.proc.returncode}:\n{tail}")
        ans = json.loads(line)
        if not ans.get("ok"):
            if ans.get("bad_input"):
                raise RenderDeviceError(ans["error"])
            raise RenderWorkerError(f"render worker error:\n{ans.get('error')}")
        return ans

    def select_device(self, device: str) -> dict:
        """Point this worker's Cycles at `device`; RenderDeviceError naming it if it is not there."""
        return self.request({"cmd": "device", "device": device})["device"]

    def info(self) -> dict:
        return self.request({"cmd": "info"})["renderer"]

    def close(self):
        if self.proc.poll() is None:
            with contextlib.suppress(OSError, BrokenPipeError):
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.close()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------------------------- pair making


def plan_k(cfg: GenerateConfig, index: int) -> int:
    """Number of differences of pair `index`: fixed per index so that rejections never change K."""
    rng = random.Random(S.derive_seed("k", cfg.seed, index))
    if rng.random() < float(cfg.no_diff_fraction):
        return 0
    lo, hi = S.parse_k(cfg.k)
    return rng.randint(lo, hi)


def sample_candidate(vocab: S.Vocabulary, cand_seed: int, k: int, weights=None) -> tuple[dict, list, dict]:
    """Scene A, edits and scene B of one candidate, all determined by (vocabulary, cand_seed, k)."""
    scene_a = S.sample_scene(vocab, cand_seed)
    edits = S.sample_edits(vocab, scene_a, k, S.derive_seed("edits", cand_seed), weights=weights)
    return scene_a, edits, S.apply_edits(vocab, scene_a, edits)


class PairMaker:
    """Makes one accepted pair per index, resampling rejected candidates from derived seeds."""

    def __init__(self, cfg: GenerateConfig, vocab: S.Vocabulary, worker: RenderWorker, shard_dir: Path):
        self.cfg, self.vocab, self.worker, self.shard_dir = cfg, vocab, worker, shard_dir
        self.render = cfg.render_settings()
        self.gates = vocab.gate_thresholds(cfg.width, cfg.height)
        self.vocab_sha = _vocab_sha(vocab)

    def make(self, index: int) -> tuple[dict, dict]:
        """Returns (manifest record, stats delta). Files are complete on disk when this returns."""
        cfg, pid = self.cfg, pair_id(self.cfg.seed, index)
        k = plan_k(cfg, index)
        delta = {"candidates": 0, "rejected": collections.Counter(), "render_cpu_s": 0.0}
        final_a, final_b = self.shard_dir / f"{pid}_a.png", self.shard_dir / f"{pid}_b.png"
        tmp_a, tmp_b = temp_path(final_a, ".png"), temp_path(final_b, ".png")
        for attempt in range(self.vocab.gates["max_attempts_per_pair"]):
            cand_seed = S.derive_seed("candidate", cfg.seed, index, attempt)
            delta["candidates"] += 1
            try:
                scene_a, edits, scene_b = sample_candidate(self.vocab, cand_seed, k, cfg.change_weights)
            except S.SamplingError:
                delta["rejected"]["sampling_failed"] += 1
                continue
            if S.interpenetrating_pairs(scene_b):
                delta["rejected"]["interpenetration"] += 1
                continue
            differences = [{"type": e["type"], "object_id": e["object_id"]} for e in edits]
            render = dict(self.render, seed=cand_seed % (2**31))
            job = {"scene_a": scene_a, "scene_b": scene_b, "differences": differences, "render": render,
                   "gates": self.gates, "out_a": str(tmp_a), "out_b": str(tmp_b)}  # fmt: skip
            if cfg.save_masks:
                job["save_masks"] = str(self.shard_dir / pid)
            ans = self.worker.request(job)
            delta["render_cpu_s"] += ans.get("timing", {}).get("cpu_s", 0.0)
            delta["peak_rss_mb"] = max(delta.get("peak_rss_mb", 0.0), ans.get("peak_rss_mb", 0.0))
            if ans["accepted"] and cfg.difficulty_filters:
                why = difficulty_failure(cfg.difficulty_filters, ans["differences"])
                if why:
                    ans.update(accepted=False, reason="difficulty_filter", detail=why)
            if not ans["accepted"]:
                delta["rejected"][ans["reason"]] += 1
                for t in (tmp_a, tmp_b):
                    t.unlink(missing_ok=True)
                continue
            record = {
                "pair_id": pid,
                "index": index,
                "seed": cand_seed,
                "generator": {
                    "seed": cfg.seed,
                    "index": index,
                    "attempt": attempt,
                    "k": k,
                    "vocabulary": self.vocab.path,
                    "vocabulary_sha256": self.vocab_sha,
                    "change_weights": cfg.change_weights,
                    "difficulty_filters": cfg.difficulty_filters,
                },
                "width": cfg.width,
                "height": cfg.height,
                "renderer": {**ans["renderer"], "settings": render},
                "images": {"a": final_a.name, "b": final_b.name},
                "scene": scene_a,
                "scene_b": scene_b,
                "edits": edits,
                "differences": ans["differences"],
                "num_differences": len(ans["differences"]),
                "num_objects_a": len(scene_a["objects"]),
                "num_objects_b": len(scene_b["objects"]),
                "objects_a": ans["objects_a"],
                "objects_b": ans["objects_b"],
            }
            os.replace(tmp_a, final_a)
            os.replace(tmp_b, final_b)
            atomic_write_text(self.shard_dir / f"{pid}.json", json.dumps(record, indent=1))
            manifest = {
                "pair_id": pid,
                "json": f"{self.shard_dir.name}/{pid}.json",
                "image_a": f"{self.shard_dir.name}/{final_a.name}",
                "image_b": f"{self.shard_dir.name}/{final_b.name}",
                "num_differences": record["num_differences"],
                "types": [d["type"] for d in record["differences"]],
                "index": index,
            }
            return manifest, delta
        raise RuntimeError(
            f"pair {pid}: no candidate passed the quality gates in {self.vocab.gates['max_attempts_per_pair']} "
            f"attempts (rejections: {dict(delta['rejected'])}); relax gates in {self.vocab.path} or lower --k"
        )


def _vocab_sha(vocab: S.Vocabulary) -> str:
    import hashlib

    return hashlib.sha256(Path(vocab.path).read_bytes()).hexdigest()[:16]


# ------------------------------------------------------------------------------------- output directory


class RunState:
    """Manifest, stats and resume bookkeeping of one shard in one output directory."""

    def __init__(self, cfg: GenerateConfig, vocab: S.Vocabulary):
        self.cfg, self.out = cfg, Path(cfg.out)
        self.shard_dir = self.out / shard_folder(cfg.shard)
        self.shard_dir.mkdir(parents=True, exist_ok=True)
        self._check_config(vocab)
        self.lock = threading.Lock()
        for stale in self.shard_dir.glob(f"*{TMP_MARK}*"):  # leftovers of a killed run
            stale.unlink(missing_ok=True)
        self.done = self._read_manifest()
        self.stats = self._read_stats()
        self.stats["renderer_settings"] = cfg.render_settings()

    def _check_config(self, vocab):
        want = {"seed": self.cfg.seed, "k": str(self.cfg.k), "width": self.cfg.width, "height": self.cfg.height,
                "samples": self.cfg.samples, "denoise": self.cfg.denoise,
                "no_diff_fraction": float(self.cfg.no_diff_fraction),
                "render_overrides": self.cfg.render_overrides, "change_weights": self.cfg.change_weights,
                "vocab_sha": _vocab_sha(vocab), "difficulty_filters": self.cfg.difficulty_filters}  # fmt: skip
        path = self.out / CONFIG
        if path.exists():
            have = json.loads(path.read_text())
            have.setdefault("difficulty_filters", {})  # runs made before the filters existed had none
            diff = [key for key in RESUME_KEYS if have.get(key) != want[key]]
            if diff:
                raise ValueError(
                    f"{self.out} holds a run with different settings ({', '.join(f'{d}: {have.get(d)!r} -> {want[d]!r}' for d in diff)}); "
                    "use a new --out or the same settings to resume"
                )
        else:
            atomic_write_text(path, json.dumps(want, indent=1))

    def _read_manifest(self) -> set[str]:
        manifest = read_manifest(self.out, required=False)
        end_torn_line(self.out)
        return {e.pair_id for e in manifest.entries if manifest.record_path(e).exists()}

    def _read_stats(self) -> dict:
        path = self.shard_dir / STATS
        if path.exists():
            with contextlib.suppress(json.JSONDecodeError):
                st = json.loads(path.read_text())
                st["rejected"] = collections.Counter(st.get("rejected", {}))
                st["differences_by_type"] = collections.Counter(st.get("differences_by_type", {}))
                return st
        return {"accepted": 0, "candidates": 0, "rejected": collections.Counter(), "render_cpu_s": 0.0,
                "differences_by_type": collections.Counter(), "shard": list(self.cfg.shard)}  # fmt: skip

    def todo(self) -> list[int]:
        i, n = self.cfg.shard
        return [j for j in range(self.cfg.num) if j % n == i and pair_id(self.cfg.seed, j) not in self.done]

    def commit(self, record: dict, delta: dict) -> None:
        """Append the finished pair to the manifest (one O_APPEND write) and update the stats."""
        with self.lock:
            if record["pair_id"] in self.done:
                return
            append_entry(self.out, record)
            self.done.add(record["pair_id"])
            st = self.stats
            st["accepted"] += 1
            st["candidates"] += delta["candidates"]
            st["rejected"].update(delta["rejected"])
            st["render_cpu_s"] = round(st["render_cpu_s"] + delta["render_cpu_s"], 3)
            st["peak_rss_mb_per_worker"] = round(
                max(st.get("peak_rss_mb_per_worker", 0.0), delta.get("peak_rss_mb", 0.0)), 1
            )
            st["differences_by_type"].update(record["types"])
            self._write_stats()

    def _write_stats(self) -> None:
        st = dict(
            self.stats,
            rejected=dict(self.stats["rejected"]),
            differences_by_type=dict(self.stats["differences_by_type"]),
        )
        atomic_write_text(self.shard_dir / STATS, json.dumps(st, indent=1))
        # Top-level stats: the sum over every shard folder of this output directory.
        total = {"accepted": 0, "candidates": 0, "rejected": collections.Counter(), "render_cpu_s": 0.0,
                 "differences_by_type": collections.Counter(), "shards": []}  # fmt: skip
        for p in sorted(self.out.glob(f"shard-*/{STATS}")):
            with contextlib.suppress(json.JSONDecodeError, OSError):
                s = json.loads(p.read_text())
                for key in ("accepted", "candidates", "render_cpu_s"):
                    total[key] += s.get(key, 0)
                total["rejected"].update(s.get("rejected", {}))
                total["differences_by_type"].update(s.get("differences_by_type", {}))
                total["shards"].append(p.parent.name)
                total["peak_rss_mb_per_worker"] = max(
                    total.get("peak_rss_mb_per_worker", 0.0), s.get("peak_rss_mb_per_worker", 0.0)
                )
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


def _progress(cfg, total):
    if not cfg.progress:
        return contextlib.nullcontext(None)
    from tqdm import tqdm

    return tqdm(total=total, unit="pair", desc=f"pairs {shard_folder(cfg.shard)}", dynamic_ncols=True)


def _run_local(cfg: GenerateConfig, vocab: S.Vocabulary, state: RunState, todo: list[int]) -> None:
    python = render_python()
    n_workers = min(cfg.workers, len(todo))
    workers = [RenderWorker(python) for _ in range(n_workers)]  # spawned from this thread (parent-death signal)
    try:
        for w in workers:  # before any rendering: a missing GPU stops the run here
            w.select_device(cfg.device)
    except BaseException:
        for w in workers:
            w.close()
        raise
    jobs: queue.Queue[int] = queue.Queue()
    for i in todo:
        jobs.put(i)
    errors: list[BaseException] = []
    stop = threading.Event()

    def loop(worker, bar):
        maker = PairMaker(cfg, vocab, worker, state.shard_dir)
        while not stop.is_set():
            try:
                index = jobs.get_nowait()
            except queue.Empty:
                return
            try:
                record, delta = maker.make(index)
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)
                stop.set()
                return
            state.commit(record, delta)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(rejected=sum(state.stats["rejected"].values()), refresh=False)

    try:
        with _progress(cfg, len(todo)) as bar:
            threads = [threading.Thread(target=loop, args=(w, bar), daemon=True) for w in workers]
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(0.5)
    finally:
        stop.set()
        for w in workers:
            w.close()
    if errors:
        raise errors[0]


def _ray_chunk(cfg_dict: dict, indices: list[int], python: str) -> list[tuple[dict, dict]]:
    """One Ray task: drive a render worker subprocess over a chunk of pair indices."""
    cfg = GenerateConfig(**cfg_dict)
    vocab = S.load_vocabulary(cfg.vocab)
    shard_dir = Path(cfg.out) / shard_folder(cfg.shard)
    with RenderWorker(python) as worker:
        worker.select_device(cfg.device)
        maker = PairMaker(cfg, vocab, worker, shard_dir)
        out = []
        for index in indices:
            record, delta = maker.make(index)
            delta["rejected"] = dict(delta["rejected"])
            out.append((record, delta))
    return out


def _run_ray(cfg: GenerateConfig, vocab: S.Vocabulary, state: RunState, todo: list[int]) -> None:
    import ray

    python = str(render_python())
    threads = cfg.threads_per_worker
    started_here = not ray.is_initialized()  # then we own the connection (and a "local" cluster): shut it down
    if started_here:
        if cfg.ray_address == "local":
            ray.init(address="local", num_cpus=cfg.workers * threads, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=cfg.ray_address, log_to_driver=False)
    try:
        task = ray.remote(num_cpus=threads, max_retries=2)(_ray_chunk)
        cfg_dict = dataclasses.asdict(cfg)
        cfg_dict.update(out=str(cfg.out), vocab=str(cfg.vocab) if cfg.vocab else None, progress=False)
        chunk = 4  # small chunks: a killed driver loses little work; start-up (~1 s) is paid per chunk
        pending = [task.remote(cfg_dict, todo[i : i + chunk], python) for i in range(0, len(todo), chunk)]
        with _progress(cfg, len(todo)) as bar:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                for record, delta in ray.get(ready[0]):
                    delta["rejected"] = collections.Counter(delta["rejected"])
                    state.commit(record, delta)
                    if bar is not None:
                        bar.update(1)
    finally:
        if started_here:
            ray.shutdown()


def generate(cfg: GenerateConfig) -> dict:
    """Generate (or resume) a run; returns the stats dict also written to <out>/stats.json."""
    cfg.validate()
    cfg.out = Path(cfg.out)
    vocab = S.load_vocabulary(cfg.vocab)  # a bad vocabulary fails here, before any render
    if cfg.ray_address is None:
        render_python()  # a missing render venv fails here too
    state = RunState(cfg, vocab)
    todo = state.todo()
    t0 = time.perf_counter()
    if todo:
        (_run_ray if cfg.ray_address else _run_local)(cfg, vocab, state, todo)
    stats = state.summary()
    stats["this_run"] = {"pairs": len(todo), "wall_s": round(time.perf_counter() - t0, 2)}
    return stats


# -------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m data_prep.generate", description=__doc__.split("\n")[0])
    p.add_argument("--num", type=int, required=True, help="number of pairs of the whole run (all shards)")
    p.add_argument("--k", default="1", help="differences per pair: an integer or a uniform range like 1-4 (default 1)")
    p.add_argument("--seed", type=int, default=0, help="run seed; pair ids and content derive from (seed, index)")
    p.add_argument("--out", type=Path, required=True, help="output directory (created; reruns resume)")
    p.add_argument("--width", type=int, default=480)
    p.add_argument("--height", type=int, default=320)
    p.add_argument("--samples", type=int, default=16, help="Cycles samples per pixel (default 16 + OIDN)")
    p.add_argument("--no-denoise", action="store_true", help="turn the OIDN denoiser off (tests: 1 spp)")
    p.add_argument("--workers", type=int, default=1, help="render worker processes (or concurrent Ray tasks)")
    p.add_argument("--threads", type=int, default=None, help="Cycles threads per worker (default cores/workers)")
    p.add_argument("--shard", default="0/1", help="i/N: make only pairs with index %% N == i (default 0/1)")
    p.add_argument("--no-diff-fraction", type=float, default=0.0, help="fraction of pairs with zero differences")
    p.add_argument("--ray-address", default=None, help="Ray cluster address ('auto', 'ray://...') or 'local'")
    p.add_argument("--vocab", type=Path, default=None, help="scene vocabulary YAML (default data_prep/vocabulary.yaml)")
    p.add_argument("--save-masks", action="store_true", help="also save the Object Index masks as .npy")
    p.add_argument("--device", default="cpu", choices=DEVICES,
                   help="Cycles device (default cpu); auto = OptiX, CUDA or HIP if present, else cpu")  # fmt: skip
    p.add_argument(
        "--difficulty",
        default="",
        metavar="KEY=V,...",
        help="difficulty filters, e.g. min_visible_px=800,max_occluded_fraction=0.5 (default: none)",
    )
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        cfg = GenerateConfig(
            out=args.out, num=args.num, k=args.k, seed=args.seed, width=args.width, height=args.height,
            samples=args.samples, workers=args.workers, threads=args.threads, no_diff_fraction=args.no_diff_fraction,
            shard=parse_shard(args.shard), vocab=args.vocab, ray_address=args.ray_address,
            progress=not args.no_progress, denoise=not args.no_denoise, save_masks=args.save_masks,
            difficulty_filters=parse_filters(args.difficulty), device=args.device,
        )  # fmt: skip
        stats = generate(cfg)
    except (ValueError, S.VocabularyError, RenderEnvError) as exc:
        parser.exit(2, f"error: {exc}\n")
    print(json.dumps({k: stats[k] for k in ("accepted", "candidates", "rejected", "acceptance_rate", "this_run")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
