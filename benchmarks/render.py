"""Render benchmark of the DiG pair generator; prints one JSON object per line.

    .venv/bin/python benchmarks/render.py [--pairs 12] [--psnr-scenes 3] [--skip-clevr]
    .venv/bin/python benchmarks/render.py --pairs 100 --configs 1x2 --seed 4242 --psnr-scenes 0 --keep /tmp/runs
        # one configuration, kept on disk for `python -m data_prep.audit --pairs /tmp/runs/tp-w1-t2`

Figures: pairs/hour at the defaults (480x320, 16 spp, OIDN) with 1 worker x 1 thread, 2 workers x 1 thread
and 1 worker x 2 threads (whole pipeline: sampling, both renders, masks, gates, files, rejections included);
CPU-seconds per accepted pair; peak RSS per worker; PSNR of the default setting against a 128-spp reference
(OIDN high quality) on the same scenes; cost of CLEVR's original setting (512 spp, no denoiser) relative to
the default on the same scene. Wall times are noisy on a shared machine; CPU-seconds are the stable figure.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from data_prep.render import scene as S  # noqa: E402
from data_prep.render.generate import GenerateConfig, RenderWorker, generate, sample_candidate  # noqa: E402

# Same scene, same bounces: the figures isolate the cost and noise of samples + denoiser.
REFERENCE = {
    "samples": 128,
    "denoise": True,
    "denoising_quality": "HIGH",
    "denoising_prefilter": "ACCURATE",
    "denoising_input_passes": "RGB_ALBEDO_NORMAL",
}
CLEVR = {"samples": 512, "denoise": False}


def emit(**kv):
    print(json.dumps(kv), flush=True)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def throughput(pairs: int, workers: int, threads: int, tmp: Path, seed: int | None = None) -> None:
    out = tmp / f"tp-w{workers}-t{threads}"
    seed = 1000 + workers * 10 + threads if seed is None else seed
    cfg = GenerateConfig(out=out, num=pairs, k="1-4", seed=seed, workers=workers, threads=threads, progress=False)
    t0 = time.perf_counter()
    stats = generate(cfg)
    wall = time.perf_counter() - t0
    emit(
        metric="pairs_per_hour",
        workers=workers,
        threads_per_worker=threads,
        value=round(pairs / wall * 3600, 1),
        pairs=pairs,
        seed=seed,
        out=str(out),
        acceptance_rate=stats["acceptance_rate"],
        wall_s=round(wall, 1),
        cpu_s_per_pair=round(stats["render_cpu_s"] / pairs, 2),
        candidates=stats["candidates"],
        rejected=stats["rejected"],
        peak_rss_mb_per_worker=stats.get("peak_rss_mb_per_worker"),
        # What the machine's cores would give if nothing else ran on them (CPU-seconds are contention-proof).
        cpu_bound_estimate_pairs_per_hour_all_cores=round(
            (os.cpu_count() or 1) * 3600 / (stats["render_cpu_s"] / pairs), 1
        ),
        load_avg_1m_at_end=round(os.getloadavg()[0], 2),
        setting="480x320, 16 spp, OIDN balanced (colour pass), bounces 2/1/1, mask pre-pass, K uniform 1-4",
    )


def image_quality(n_scenes: int, tmp: Path, skip_clevr: bool) -> None:
    vocab = S.load_vocabulary()
    default = GenerateConfig(out=tmp, num=1, threads=os.cpu_count() or 1).render_settings()
    gates = vocab.gate_thresholds(480, 320)
    values, cpu = [], {"default": [], "reference": []}
    with RenderWorker() as worker:

        def render(name, scene, settings, seed):
            job = {
                "scene_a": scene,
                "scene_b": scene,
                "differences": [],
                "render": dict(settings, seed=seed),
                "gates": gates,
                "out_a": str(tmp / f"{name}.png"),
                "out_b": str(tmp / f"{name}_b.png"),
                "only_a": True,
            }
            ans = worker.request(job)
            return np.asarray(Image.open(tmp / f"{name}.png").convert("RGB")), ans["timing"]["cpu_s"]

        render("warmup", sample_candidate(vocab, 1, 1)[0], dict(default, samples=1), 0)
        scenes = [sample_candidate(vocab, 500 + i, 1)[0] for i in range(n_scenes)]
        for i, sc in enumerate(scenes):
            img, c = render(f"default{i}", sc, default, i)
            ref, cr = render(f"ref{i}", sc, {**default, **REFERENCE}, i)
            values.append(psnr(img, ref))
            cpu["default"].append(c)
            cpu["reference"].append(cr)
        emit(
            metric="psnr_default_vs_128spp_reference_db",
            value=round(float(np.mean(values)), 2),
            per_scene=[round(v, 2) for v in values],
            scenes=n_scenes,
            cpu_s_per_image_default=round(float(np.mean(cpu["default"])), 2),
            cpu_s_per_image_reference=round(float(np.mean(cpu["reference"])), 2),
        )
        if not skip_clevr:
            sc = scenes[0]
            img, c = render("clevr0", sc, {**default, **CLEVR}, 0)
            ref = np.asarray(Image.open(tmp / "ref0.png").convert("RGB"))
            emit(
                metric="clevr_512spp_cost_ratio",
                value=round(c / cpu["default"][0], 1),
                cpu_s_per_image_clevr=round(c, 2),
                cpu_s_per_image_default=round(cpu["default"][0], 2),
                psnr_clevr_vs_reference_db=round(psnr(img, ref), 2),
                psnr_default_vs_reference_db=round(values[0], 2),
                scene=0,
            )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=12, help="pairs per throughput configuration")
    p.add_argument("--psnr-scenes", type=int, default=3)
    p.add_argument("--skip-clevr", action="store_true", help="skip the 512-spp render (~140 CPU-s)")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument(
        "--configs", default="1x1,2x1,1x2", help="throughput configurations WORKERSxTHREADS, comma-separated"
    )
    p.add_argument(
        "--seed", type=int, default=None, help="run seed of every throughput run (default: per configuration)"
    )
    p.add_argument(
        "--keep",
        type=Path,
        default=None,
        help="write the throughput runs under this folder and keep them (e.g. to audit them afterwards)",
    )
    args = p.parse_args()
    configs = [tuple(int(v) for v in c.split("x")) for c in args.configs.split(",") if c]
    emit(metric="machine", cpus=os.cpu_count(), load_avg_1m=os.getloadavg()[0])
    with tempfile.TemporaryDirectory(prefix="dig-bench-") as d:
        tmp = Path(d)
        if not args.skip_throughput:
            for workers, threads in configs:
                throughput(args.pairs, workers, threads, args.keep or tmp, args.seed)
        if args.psnr_scenes > 0:
            image_quality(args.psnr_scenes, tmp, args.skip_clevr)
    emit(metric="machine_end", load_avg_1m=os.getloadavg()[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
