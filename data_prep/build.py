"""Build the curriculum datasets: generate (resuming) the pairs of each stage, then convert them to verl parquet.

    python -m data_prep.build --out-dir data --model qwen3_vl_8b_thinking --stage all

Layout under ``--out-dir``: the pairs are rendered once and shared by every model; the parquets are per model
(prompt wording, per-image pixel bounds, coordinate frame)::

    pairs/stage1/{train,val}/ ...                 generator output (docs/contracts.md, pair record), one folder
                                                  per generation run of the stage as stages.yaml defines it
    pairs/test/test/{1-k1,...}/                   the test split: one run per K
    <model>/stage1/{train,val}.parquet ... stage3 verl rows (docs/contracts.md, parquet row) for --model
    <model>/test/test.parquet

Stage sizes, K distributions, seeds and the no-difference fraction come from ``data_prep/stages.yaml``. Reruns
skip what is done: a run whose manifest already holds its pairs is not started again, and a parquet whose
recorded metadata (model, stage, split, pair ids, prompt, pixel bounds) matches is not rewritten. A second
``--model`` only converts (seconds). Before converting, the pair seeds of the test split are checked to be
disjoint from every training and validation run found under ``pairs/``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from data_prep import to_verl
from data_prep.manifest import manifest_path, read_manifest
from data_prep.render.generate import DEVICES, GenerateConfig
from data_prep.runner import RESUME_HINT as PAIRS_KEPT
from data_prep.stages import (
    RENDERED_ONLY,
    STAGES_FILE,
    Curriculum,
    Run,
    SourceMix,
    Stage,
    load_curriculum,
    load_source_mixes,
)
from dig_common.argtypes import positive_int
from dig_common.cli import CliError, cli_main, tool_parser
from dig_common.models import load_model_spec

PROG = "python -m data_prep.build"
TEST_STAGE = "test"


@dataclass(frozen=True)
class BuildOptions:
    width: int = GenerateConfig.width  # the generators' defaults (runner.RunConfig, GenerateConfig)
    height: int = GenerateConfig.height
    samples: int = GenerateConfig.samples
    workers: int = 1
    denoise: bool = True
    ray_address: str | None = None
    progress: bool = True
    system_prompt: str | None = None
    vocab: Path | None = None
    coco: Path | None = None  # photo source: COCO-format annotations (overrides the stages file's photo.coco)
    images: Path | None = None  # ... and its image folder (photo.images)
    device: str = "cpu"  # Cycles device (data_prep.render --device)


def stage_dir_name(stage: Stage) -> str:
    return stage.name if stage.name == TEST_STAGE else f"stage{stage.name}"


def run_dirs(data_dir: Path, stage: Stage, split: str) -> list[Path]:
    """One folder per generation run of ``split``; a split made of several runs gets a sub-folder per run."""
    base = data_dir / "pairs" / stage_dir_name(stage) / split
    runs = stage.splits[split]
    if len(runs) == 1:
        return [base]
    return [base / f"{i}-k{run.k}" for i, run in enumerate(runs)]


def photo_run_dirs(data_dir: Path, stage: Stage, split: str) -> list[Path]:
    """The photo-source sibling of each run folder (``train`` -> ``train-photo``) of a stage with a source mix."""
    return [d.with_name(f"{d.name}-photo") for d in run_dirs(data_dir, stage, split)]


def source_runs(data_dir: Path, stage: Stage, split: str, mix: SourceMix) -> list[tuple[str, Run, Path]]:
    """(source, run, folder) of every generation run of ``split``: each stages.yaml run split by the mix."""
    out = []
    for run, rendered_dir, photo_dir in zip(
        stage.splits[split], run_dirs(data_dir, stage, split), photo_run_dirs(data_dir, stage, split), strict=True
    ):
        counts = mix.counts(run.num)
        for source, folder in (("rendered", rendered_dir), ("photo", photo_dir)):
            if counts[source]:
                out.append((source, replace(run, num=counts[source]), folder))
    return out


def parquet_path(data_dir: Path, model_name: str, stage: Stage, split: str) -> Path:
    """``<data_dir>/<model>/stage<k>/<split>.parquet``: the file the recipe's data.train_files / val_files name."""
    return data_dir / model_name / stage_dir_name(stage) / f"{split}.parquet"


def manifest_size(pairs_dir: Path, num: int) -> int:
    """How many of the run's first ``num`` pairs the manifest already lists with all their files (a pair that
    lost one is missing: the generator makes it again)."""
    manifest = read_manifest(pairs_dir, required=False)
    return sum(1 for e in manifest.entries if e.index is not None and e.index < num and manifest.complete(e))


def pairs_to_make(data_dir: Path, stage: Stage, splits: list[str], mix: SourceMix) -> dict[str, int]:
    """Pairs each source still has to generate for ``splits`` of ``stage`` ({"rendered": n, "photo": m}); zero for
    both means a build only converts."""
    todo = {"rendered": 0, "photo": 0}
    for split in splits:
        for source, run, pairs_dir in source_runs(Path(data_dir), stage, split, mix):
            todo[source] += run.num - manifest_size(pairs_dir, run.num)
    return todo


def _shared_config(run: Run, out: Path, options: BuildOptions) -> dict:
    """The config fields both pair sources take from a stages.yaml run and the build options."""
    return {
        "out": out,
        "num": run.num,
        "k": run.k,
        "seed": run.seed,
        "width": options.width,
        "height": options.height,
        "workers": options.workers,
        "no_diff_fraction": run.no_diff_fraction,
        "ray_address": options.ray_address,
        "progress": options.progress,
    }


def render_settings(curriculum: Curriculum, width=None, height=None, samples=None) -> dict[str, int]:
    """Width, height and samples of every run: the flag, else the stages file's ``render:``, else the generator's
    default."""
    given = {"width": width, "height": height, "samples": samples}
    return {key: int(value or curriculum.render.get(key, getattr(BuildOptions, key))) for key, value in given.items()}


def _generator_config(run: Run, out: Path, options: BuildOptions):
    return GenerateConfig(
        **_shared_config(run, out, options),
        samples=options.samples,
        vocab=options.vocab,
        denoise=options.denoise,
        difficulty_filters=run.difficulty,
        device=options.device,
    )


def _real_generate(config) -> dict:
    from data_prep.render.generate import generate

    return generate(config)


def _photo_config(run: Run, out: Path, options: BuildOptions, mix: SourceMix):
    from data_prep.photo.pairs import PhotoConfig

    return PhotoConfig(
        **_shared_config(run, out, options),
        coco=mix.coco,
        images=mix.images,
        categories=list(mix.categories) if mix.categories else None,
        settings=mix.settings,
    )


def _real_photo_generate(config) -> dict:
    from data_prep.photo.pairs import generate

    return generate(config)


def pair_seeds(pairs_dir: Path) -> dict[int, str]:
    """seed -> pair_id of every pair of a run (the seed recorded in each pair record)."""
    seeds = {}
    for ref in to_verl.read_manifest(pairs_dir):
        record = json.loads(ref.json_path.read_text(encoding="utf-8"))
        seeds[int(record["seed"])] = ref.pair_id
    return seeds


def check_test_seeds_disjoint(data_dir: Path, curriculum: Curriculum) -> None:
    """Raise if a test pair shares its seed with a training/validation pair under ``data_dir/pairs``."""
    if TEST_STAGE not in curriculum.stages:
        return
    test_stage = curriculum.stages[TEST_STAGE]
    test_seeds: dict[int, str] = {}
    for split in test_stage.splits:
        for pairs_dir in run_dirs(data_dir, test_stage, split) + photo_run_dirs(data_dir, test_stage, split):
            if manifest_path(pairs_dir).is_file():
                test_seeds.update(pair_seeds(pairs_dir))
    if not test_seeds:
        return
    for stage in curriculum.stages.values():
        if stage.name == TEST_STAGE:
            continue
        for split in stage.splits:
            for pairs_dir in run_dirs(data_dir, stage, split) + photo_run_dirs(data_dir, stage, split):
                if not manifest_path(pairs_dir).is_file():
                    continue
                shared = [(seed, pid) for seed, pid in pair_seeds(pairs_dir).items() if seed in test_seeds]
                if shared:
                    seed, pid = shared[0]
                    raise ValueError(
                        f"test pair {test_seeds[seed]} and {pairs_dir.relative_to(data_dir)} pair {pid} share seed "
                        f"{seed} ({len(shared)} shared in all): give the test runs in {STAGES_FILE.name} seeds "
                        "disjoint from training"
                    )


def build(
    data_dir: Path,
    model: str | Path,
    stages: list[str],
    curriculum: Curriculum,
    options: BuildOptions = BuildOptions(),
    generate_fn: Callable[[object], dict] = _real_generate,
    log: Callable[[dict], None] = lambda event: print(json.dumps(event), flush=True),
    mixes: dict[str, SourceMix] | None = None,
    photo_generate_fn: Callable[[object], dict] = _real_photo_generate,
) -> list[dict]:
    """Generate and convert ``stages`` (names from the curriculum); returns one event per split.

    ``mixes``: source mix per stage name (``stages.load_source_mixes``); None or a missing stage: rendered only.
    """
    data_dir = Path(data_dir)
    model_name = load_model_spec(model).model_name  # bad model name: fail before generating anything
    selected = [curriculum.stage(name) for name in stages]
    mixes = {s.name: (mixes or {}).get(s.name, SourceMix(dict(RENDERED_ONLY))) for s in selected}
    mixes = {name: mix.with_paths(options.coco, options.images) for name, mix in mixes.items()}
    if data_dir.exists() and not data_dir.is_dir():
        raise NotADirectoryError(f"--out-dir {data_dir} is a file: give the folder the datasets go to")
    for stage in selected:
        for split in stage.splits:
            to_verl.check_parquet_path(parquet_path(data_dir, model_name, stage, split))
    for stage in selected:  # the mix is reported first; a photo share without a COCO set fails before any work
        mix = mixes[stage.name]
        if mix.uses_photo:
            check_photo_source(stage, mix)
        if mix.fractions != RENDERED_ONLY:  # the paper's default stays silent
            pairs = {split: _source_counts(data_dir, stage, split, mix) for split in stage.splits}
            log({"event": "mix", "stage": stage.name, "sources": mix.describe(), "pairs": pairs})
    # Generation first (the slow part, resumable), then the seed check, then conversion.
    for stage in selected:
        for split in stage.splits:
            for source, run, pairs_dir in source_runs(data_dir, stage, split, mixes[stage.name]):
                have = manifest_size(pairs_dir, run.num)
                if have >= run.num:
                    continue
                where = {"source": source, "stage": stage.name, "split": split, "dir": str(pairs_dir)}
                log({"event": "generate", **where, "have": have, "num": run.num, "k": run.k, "seed": run.seed})
                if source == "photo":
                    photo_generate_fn(_photo_config(run, pairs_dir, options, mixes[stage.name]))
                else:
                    generate_fn(_generator_config(run, pairs_dir, options))
                if manifest_size(pairs_dir, run.num) < run.num:
                    raise RuntimeError(f"{pairs_dir}: the generator finished with fewer than {run.num} pairs")
    check_test_seeds_disjoint(data_dir, curriculum)
    events = []
    for stage in selected:
        allowed = stage.allowed_k()
        for split in stage.splits:
            out = parquet_path(data_dir, model_name, stage, split)
            runs = source_runs(data_dir, stage, split, mixes[stage.name])
            plan = to_verl.plan_conversion(
                [folder for _, _, folder in runs],
                model,
                stage.name,
                split,
                options.system_prompt,
                limits=[run.num for _, run, _ in runs],
            )
            sources = _source_counts(data_dir, stage, split, mixes[stage.name])
            event = {"stage": stage.name, "split": split, "out": str(out), "rows": len(plan.refs), "sources": sources}
            if to_verl.read_metadata(out) == plan.metadata:
                event["event"] = "skip"
            else:
                result = to_verl.write_parquet(plan, out, allowed)
                event.update(event="convert", seconds=result["seconds"], pairs_per_s=result["pairs_per_s"])
            log(event)
            events.append(event)
    return events


def check_photo_source(stage: Stage, mix: SourceMix) -> None:
    """A stage with a photo share needs its COCO-format set on disk: checked before anything is generated."""
    if not (mix.coco and mix.images):
        raise CliError(
            f"stage {stage.name} mixes {mix.describe()} pairs: give the COCO-format set with --coco FILE "
            f"--images DIR (or photo.coco / photo.images in {STAGES_FILE.name})"
        )
    if not mix.coco.is_file():
        raise CliError(f"stage {stage.name}: COCO annotations {mix.coco} not found: give the file with --coco FILE")
    if not mix.images.is_dir():
        raise CliError(f"stage {stage.name}: image folder {mix.images} not found: give it with --images DIR")


def _source_counts(data_dir: Path, stage: Stage, split: str, mix: SourceMix) -> dict[str, int]:
    counts = {"rendered": 0, "photo": 0}
    for source, run, _ in source_runs(data_dir, stage, split, mix):
        counts[source] += run.num
    return counts


# the generators keep every finished pair; a parquet is written under a temp name, then renamed
RESUME_HINT = PAIRS_KEPT.replace("<out-dir>/manifest.jsonl", "<out-dir>/pairs/.../manifest.jsonl")


@cli_main(PROG, on_interrupt=RESUME_HINT)
def main(argv: list[str] | None = None) -> int:
    parser = tool_parser(PROG, __doc__)
    parser.add_argument(
        "--out-dir", type=Path, required=True, help="the dataset folder (pairs/, shared, and <model>/ parquets)"
    )
    parser.add_argument("--model", required=True, help="base model name or YAML path (pixel bounds, prompt)")
    parser.add_argument("--stage", required=True, help="1, 2, 3, test or all")
    parser.add_argument("--stages-file", type=Path, default=STAGES_FILE)
    parser.add_argument("--width", type=int, default=None, help="render width (default: stages file)")
    parser.add_argument("--height", type=int, default=None, help="render height (default: stages file)")
    parser.add_argument("--samples", type=int, default=None, help="Cycles samples per pixel (default: stages file)")
    parser.add_argument("--no-denoise", action="store_true", help="OIDN off (quick 1 spp test data)")
    parser.add_argument("--workers", type=int, default=1, help="render worker processes")
    parser.add_argument("--device", default="cpu", choices=DEVICES, help="Cycles device (cpu, cuda, optix, hip, auto)")
    parser.add_argument("--ray-address", default=None, help="render on a Ray cluster ('auto', 'ray://...')")
    parser.add_argument("--vocab", type=Path, default=None, help="scene vocabulary YAML (generator default)")
    parser.add_argument("--coco", type=Path, default=None, help="photo source: COCO-format annotations (stages mix)")
    parser.add_argument("--images", type=Path, default=None, help="photo source: the image folder of --coco")
    parser.add_argument("--num-train", type=positive_int, default=None, help="pairs per train split (small runs)")
    parser.add_argument("--num-val", type=positive_int, default=None, help="pairs per val split")
    parser.add_argument("--num-test", type=positive_int, default=None, help="pairs per K of the test split")
    parser.add_argument("--system-prompt", default=None, help="'default' (prompts/system.txt) or literal text")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    curriculum = load_curriculum(args.stages_file).with_sizes(args.num_train, args.num_val, args.num_test)
    stages = list(curriculum.stages) if args.stage == "all" else [curriculum.stage(args.stage).name]
    options = BuildOptions(
        **render_settings(curriculum, args.width, args.height, args.samples),
        workers=args.workers,
        denoise=not args.no_denoise,
        ray_address=args.ray_address,
        progress=not args.no_progress,
        system_prompt=args.system_prompt,
        vocab=args.vocab,
        coco=args.coco,
        images=args.images,
        device=args.device,
    )
    build(args.out_dir, args.model, stages, curriculum, options, mixes=load_source_mixes(args.stages_file))
    return 0


if __name__ == "__main__":
    sys.exit(main())
