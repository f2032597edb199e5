"""Generate DiG image pairs with Blender: ``python -m data_prep.render --num 100 --k 1-4 --out-dir data/pairs``.

Runs in the main venv and drives long-lived render workers (``data_prep/render/worker.py``) in the render
venv as subprocesses (``DIG_RENDER_PYTHON``, default ``<repo>/.venv-render/bin/python``), locally with
threads or as Ray tasks (``--ray-address``; both through ``data_prep.runner``). Output per docs/contracts.md,
pair record: ``<out>/manifest.jsonl``, ``<out>/stats.json``, ``<out>/<shard folder>/<pair_id>_a.png|_b.png|.json``;
atomic writes; reruns resume.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as futures
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import queue
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data_prep import runner as R
from data_prep.manifest import manifest_entry
from data_prep.render import scene as S
from data_prep.stages import check_difficulty_filters, difficulty_failure
from dig_common.cli import CliError, cli_main, tool_parser
from dig_common.fileio import atomic_write_text, temp_path

PROG = "python -m data_prep.render"
REPO_ROOT = Path(__file__).resolve().parents[2]
WORKER_SCRIPT = Path(__file__).resolve().with_name("worker.py")

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


class RenderEnvError(CliError):
    """The render venv is missing (bad input: the message says how to build it)."""


class RenderWorkerError(RuntimeError):
    """A render worker died or answered with an error."""


class RenderDeviceError(ValueError):
    """The requested Cycles device is not present (raised before any rendering)."""


DEVICES = ("cpu", "cuda", "optix", "hip", "auto")  # --device; checked again by the render worker


@dataclass(kw_only=True)
class GenerateConfig(R.RunConfig):
    """A rendered run: the shared run fields (``runner.RunConfig``: out, num, k, seed, width, height, workers,
    no_diff_fraction, shard, ray_address, progress) and the renderer's."""

    samples: int = 16  # Cycles samples per pixel (+ OIDN): the one home of this default
    threads: int | None = None  # per worker; default: CPU cores / workers
    vocab: Path | str | None = None
    denoise: bool = True
    render_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {"denoising_quality": "HIGH"}
    change_weights: dict[str, float] | None = None  # overrides the vocabulary's `changes`
    save_masks: bool = False  # also write <pair_id>_mask_a.npy / _mask_b.npy (Object Index pass)
    difficulty_filters: dict[str, float] = field(default_factory=dict)  # stages.DIFFICULTY_FILTERS; {} = off
    device: str = "cpu"  # Cycles device: cpu | cuda | optix | hip | auto (the best GPU backend found, else cpu)

    def validate(self) -> None:
        """Raise ValueError naming the bad flag, before any expensive work."""
        super().validate()
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
        return {
            **RENDER_DEFAULTS,
            "width": self.width,
            "height": self.height,
            "samples": self.samples,
            "denoise": self.denoise,
            "threads": self.threads_per_worker,
            **self.render_overrides,
        }

    def resume_settings(self, vocab: S.Vocabulary) -> dict:
        """What a rerun into the same output folder must repeat (config.json)."""
        return {
            "seed": self.seed,
            "k": str(self.k),
            "width": self.width,
            "height": self.height,
            "samples": self.samples,
            "denoise": self.denoise,
            "no_diff_fraction": float(self.no_diff_fraction),
            "render_overrides": self.render_overrides,
            "change_weights": self.change_weights,
            "vocab_sha": _vocab_sha(vocab),
            "difficulty_filters": self.difficulty_filters,
        }


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
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            env={**os.environ, "DIG_RENDER_PARENT_PID": str(os.getpid())},  # the worker dies with us
        )
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

    def kill(self):
        """Stop now, mid-render (an interrupted run): a pair being rendered leaves only temp files, which the next
        run removes. ``close`` would wait for the render in progress (seconds to minutes)."""
        if self.proc.poll() is None:
            self.proc.kill()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ------------------------------------------------------------------------------------------- pair making


def sample_candidate(vocab: S.Vocabulary, cand_seed: int, k: int, weights=None) -> tuple[dict, list, dict]:
    """Scene A, edits and scene B of one candidate, all determined by (vocabulary, cand_seed, k)."""
    scene_a = S.sample_scene(vocab, cand_seed)
    edits = S.sample_edits(vocab, scene_a, k, R.derive_seed("edits", cand_seed), weights=weights)
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
        cfg, pid = self.cfg, self.cfg.pair_id(index)
        k = R.plan_k(cfg, index)
        delta = R.new_delta()
        final_a, final_b = self.shard_dir / f"{pid}_a.png", self.shard_dir / f"{pid}_b.png"
        tmp_a, tmp_b = temp_path(final_a, ".png"), temp_path(final_b, ".png")
        for attempt in range(self.vocab.gates["max_attempts_per_pair"]):
            cand_seed = R.derive_seed("candidate", cfg.seed, index, attempt)
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
            job = {"scene_a": scene_a, "scene_b": scene_b, "differences": differences, "render": render}
            job.update(gates=self.gates, out_a=str(tmp_a), out_b=str(tmp_b))
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
            return manifest_entry(self.shard_dir, pid, index, record["differences"]), delta
        raise R.GateError(
            f"pair {pid}: no candidate passed the quality gates in {self.vocab.gates['max_attempts_per_pair']} "
            f"attempts (rejections: {dict(delta['rejected'])}); relax gates in {self.vocab.path} or lower --k"
        )


def _vocab_sha(vocab: S.Vocabulary) -> str:
    return hashlib.sha256(Path(vocab.path).read_bytes()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------ drivers


def start_workers(count: int, device: str) -> list[RenderWorker]:
    """``count`` render workers on ``device``, spawned from this thread (their parent-death signal follows the
    spawning thread); a device that is not there stops here, before anything is rendered."""
    python = render_python()
    workers = [RenderWorker(python) for _ in range(count)]
    try:
        for w in workers:
            w.select_device(device)
    except BaseException:
        for w in workers:
            w.close()
        raise
    return workers


def _run_local(cfg: GenerateConfig, vocab: S.Vocabulary, state: R.RunState, todo: list[int]) -> None:
    """One thread per render worker, each with its own PairMaker."""
    workers = start_workers(min(cfg.workers, len(todo)), cfg.device)
    makers: queue.SimpleQueue[PairMaker] = queue.SimpleQueue()
    for w in workers:
        makers.put(PairMaker(cfg, vocab, w, state.shard_dir))
    mine = threading.local()

    def bind() -> None:
        mine.maker = makers.get_nowait()

    try:
        with futures.ThreadPoolExecutor(len(workers), thread_name_prefix="render", initializer=bind) as pool:
            stop = functools.partial(_kill_all, workers)
            R.run_local(state, todo, lambda index: mine.maker.make(index), pool, stop=stop)
    finally:
        for w in workers:
            w.close()


def _kill_all(workers: list[RenderWorker]) -> None:
    for w in workers:
        w.kill()


def _ray_chunk(cfg: GenerateConfig, python: str, indices: list[int]) -> list[R.Result]:
    """One Ray task: drive a render worker subprocess over a chunk of pair indices."""
    vocab = S.load_vocabulary(cfg.vocab)
    with RenderWorker(python) as worker:
        worker.select_device(cfg.device)
        maker = PairMaker(cfg, vocab, worker, cfg.shard_dir)
        return [maker.make(index) for index in indices]


def _run_ray(cfg: GenerateConfig, state: R.RunState, todo: list[int]) -> None:
    task_cfg = dataclasses.replace(cfg, progress=False)
    # small chunks: a killed driver loses little work; start-up (~1 s) is paid per chunk
    R.run_ray(state, todo, _ray_chunk, (task_cfg, str(render_python())), cfg.threads_per_worker, chunk=4)


def check_k_possible(cfg: GenerateConfig, vocab: S.Vocabulary) -> None:
    """The largest K of --k must fit the vocabulary's scenes: scenes and edits are sampled (pure Python, no
    render) as the first pair's candidates would be; if none of them can place K differences, no pair ever
    will, so --k is refused in one line before anything is written."""
    high = R.parse_k(cfg.k)[1]
    attempts = int(vocab.gates["max_attempts_per_pair"])
    why: collections.Counter[str] = collections.Counter()
    for attempt in range(attempts):
        try:
            sample_candidate(vocab, R.derive_seed("k-check", cfg.seed, attempt), high, cfg.change_weights)
            return
        except S.SamplingError as err:
            why[str(err)] += 1
    raise ValueError(
        f"--k {cfg.k}: no scene of {vocab.path} can hold {high} differences ({attempts} tries: "
        f"{why.most_common(1)[0][0]}); lower --k (the curriculum uses 1-4) or allow more objects per scene"
    )


def generate(cfg: GenerateConfig) -> dict:
    """Generate (or resume) a run; returns the stats dict also written to <out>/stats.json."""
    cfg.validate()
    cfg.out = Path(cfg.out)
    vocab = S.load_vocabulary(cfg.vocab)  # a bad vocabulary fails here, before any render
    check_k_possible(cfg, vocab)
    render_python()  # a missing render venv fails here too, before the output folder is made
    state = R.RunState(cfg, cfg.resume_settings(vocab), added_later={"difficulty_filters": {}})
    return R.run(state, functools.partial(_run_local, cfg, vocab, state), functools.partial(_run_ray, cfg, state))


# -------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = tool_parser(PROG, __doc__)
    R.add_run_flags(p, workers="render worker processes")
    p.add_argument(
        "--samples",
        type=int,
        default=GenerateConfig.samples,
        help=f"Cycles samples per pixel (default {GenerateConfig.samples} + OIDN)",
    )
    p.add_argument("--no-denoise", action="store_true", help="turn the OIDN denoiser off (tests: 1 spp)")
    p.add_argument("--threads", type=int, default=None, help="Cycles threads per worker (default cores/workers)")
    p.add_argument(
        "--vocab", type=Path, default=None, help="scene vocabulary YAML (default data_prep/render/vocabulary.yaml)"
    )
    p.add_argument("--save-masks", action="store_true", help="also save the Object Index masks as .npy")
    device_help = "Cycles device (default cpu); auto = OptiX, CUDA or HIP if present, else cpu"
    p.add_argument("--device", default="cpu", choices=DEVICES, help=device_help)
    p.add_argument(
        "--difficulty",
        default="",
        metavar="KEY=V,...",
        help="difficulty filters, e.g. min_visible_px=800,max_occluded_fraction=0.5 (default: none)",
    )
    return p


@cli_main(PROG, on_interrupt=R.RESUME_HINT)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = GenerateConfig(
        **R.run_flags(args),
        samples=args.samples,
        threads=args.threads,
        vocab=args.vocab,
        denoise=not args.no_denoise,
        save_masks=args.save_masks,
        difficulty_filters=parse_filters(args.difficulty),
        device=args.device,
    )
    R.print_summary(generate(cfg))
    return 0
