"""Running `bash launch/cpu_rehearsal.sh` from tests and reading what it leaves behind.

Evidence per stage, all written by the real run: verl's metrics (TensorBoard event files under
``<out>/checkpoints/tensorboard/dig/<experiment>``), the done marker and checkpoints, the merged HF weights, and every
weight sync vLLM loaded (``<experiment>/weight_syncs/sync-<ns>.safetensors``, recorded by
``recipes.dig.rehearsal.cpu_verl``). The checks raise AssertionError with what they found; the negative tests
run them on sabotaged runs and expect them to fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from reward_fns.dig_reward import RESULT_KEYS

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "launch" / "cpu_rehearsal.sh"
# the reward's keys (docs/contracts.md): verl logs each as val-aux/dig/<key>/mean@<n> (acc as val-core); reward_error
# among them, the count of the reward's internal errors
REWARD_KEYS = RESULT_KEYS
# rollout and actor compute in fp32 under profile=cpu: served weights equal to the actor's agree to rounding
MAX_PROBS_DIFF = 1e-3
LAUNCH_ENV = ("MODEL", "DATA_DIR", "CKPT_DIR", "RAY_ADDRESS", "DRY_RUN", "INIT_MODEL", "STAGES", "DIG_PYTHON")


@dataclass
class Run:
    rc: int
    log: str
    killed: bool = False


def run_rehearsal(
    out_dir: Path,
    *args: str,
    stages: str = "1 2 3",
    env: dict | None = None,
    timeout: float = 1500,
    kill_when: Callable[[], bool] | None = None,
    log_name: str = "rehearsal.log",
) -> Run:
    """The user's command, in its own process group; ``kill_when`` -> SIGKILL to the whole group at that point."""
    base = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV and not k.startswith("RAY_")}
    base.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", STAGES=stages)
    base.update(env or {})
    log = Path(out_dir).parent / log_name
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    killed = False
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["bash", str(SCRIPT), "--out-dir", str(out_dir), *args],
            cwd=REPO,
            env=base,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        try:
            while proc.poll() is None:
                if kill_when is not None and kill_when():
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed = True
                    proc.wait()
                    break
                if time.monotonic() > deadline:
                    raise AssertionError(f"cpu_rehearsal.sh ran past {timeout} s; log: {log}")
                time.sleep(0.2)
        finally:
            stop_group(proc)
    return Run(proc.returncode, log.read_text(), killed)


def stop_group(proc: subprocess.Popen) -> None:
    """Whatever the run left in its process group (Ray's daemons included) is ended."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def experiment(out_dir: Path, model: str, stage: int) -> Path:
    return Path(out_dir) / "checkpoints" / "dig" / f"{model}_stage{stage}"


def scalars(out_dir: Path, model: str, stage: int) -> dict[str, dict[int, float]]:
    """Every scalar verl logged for the stage: tag -> {step: value} (all event files of the experiment)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = Path(out_dir) / "checkpoints" / "tensorboard" / "dig" / f"{model}_stage{stage}"
    found: dict[str, dict[int, float]] = {}
    for events in sorted(folder.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            for event in acc.Scalars(tag):
                found.setdefault(tag, {})[event.step] = event.value
    assert found, f"no TensorBoard scalars under {folder}"
    return found


def syncs(exp: Path) -> list[Path]:
    """Weight syncs vLLM loaded, in time order."""
    return sorted((exp / "weight_syncs").glob("sync-*.safetensors"), key=lambda p: int(p.stem.split("-")[1]))


def load(path: Path) -> dict:
    from safetensors.torch import load_file

    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        assert files, f"no safetensors in {path}"
        tensors = {}
        for f in files:
            tensors.update(load_file(f))
        return tensors
    return load_file(path)


# checkpoint names saved in the hub's layout -> the names of the loaded model (what verl syncs), Qwen2.5-VL's
LEGACY_PREFIXES = (("model.", "model.language_model."), ("visual.", "model.visual."))


def synced_name(name: str, synced: dict) -> str:
    if name in synced:
        return name
    for old, new in LEGACY_PREFIXES:
        if name.startswith(old) and new + name[len(old) :] in synced:
            return new + name[len(old) :]
    return name


def mismatches(synced: dict, weights: dict) -> int:
    """Elements where a sync differs from HF weights, compared in the weights' dtype (merges are bf16).
    Every tensor of ``weights`` must have been synced (under its own name or its loaded-model name)."""
    names = {k: synced_name(k, synced) for k in weights}
    missing = sorted(k for k, n in names.items() if n not in synced)
    assert not missing, f"{len(missing)} tensors never synced, e.g. {missing[:3]}"
    return sum(int((synced[names[k]].to(w.dtype) != w).sum()) for k, w in weights.items())


def merged(exp: Path) -> Path:
    marker = json.loads((exp / "dig_stage_done.json").read_text())
    path = exp / "hf_merged" / f"global_step_{marker['global_step']}"
    assert (path / "config.json").is_file(), f"stage not merged: {path}"
    return path


def expected_prompt_tokens(parquet: Path, checkpoint: Path, patch_size: int) -> set[int]:
    """Prompt lengths (image tokens included) the HF processor gives the parquet's rows, two images each."""
    import pyarrow.parquet as pq
    from transformers import AutoProcessor

    from eval.backends import dig_request, prepare

    processor = AutoProcessor.from_pretrained(checkpoint)
    lengths = set()
    for row in pq.read_table(parquet).to_pylist():
        text, images = prepare(processor, dig_request(row), patch_size)
        assert len(images) == 2, f"{parquet}: a row with {len(images)} image(s)"
        lengths.add(len(processor(text=[text], images=images, return_tensors="pt")["input_ids"][0]))
    return lengths


@dataclass
class StageEvidence:
    steps: list[int]
    metrics: dict[str, dict[int, float]] = field(repr=False)
    syncs: list[Path] = field(repr=False)


def evidence(out_dir: Path, model: str, stage: int) -> StageEvidence:
    """What a finished stage left: its logged steps and metrics, its weight syncs."""
    exp = experiment(out_dir, model, stage)
    assert (exp / "dig_stage_done.json").is_file(), f"stage {stage} did not finish: no done marker in {exp}"
    metrics = scalars(out_dir, model, stage)
    return StageEvidence(sorted(metrics.get("training/global_step", {})), metrics, syncs(exp))


def check_trained(
    out_dir: Path, model: str, stage: int, min_steps: int = 2, need_advantage: bool = True
) -> StageEvidence:
    """The stage ran >= min_steps training steps with vLLM rollouts, validation and the reward's keys, and its
    groups carried a learning signal (advantages not all zero)."""
    found = evidence(out_dir, model, stage)
    metrics, steps = found.metrics, found.steps
    assert len(steps) >= min_steps, f"stage {stage}: {len(steps)} training steps logged, want >= {min_steps}"
    for step in steps:
        assert metrics["timing_s/gen"][step] > 0, f"stage {stage} step {step}: no rollout time"
        assert metrics["response_length/mean"][step] > 0, f"stage {stage} step {step}: empty rollouts"
    for key in REWARD_KEYS:
        kind = "core" if key == "acc" else "aux"
        tags = [t for t in metrics if re.fullmatch(rf"val-{kind}/dig/{key}/mean@\d+", t)]
        assert tags, f"stage {stage}: validation logged no {key!r} (tags: {sorted(t for t in metrics if 'val' in t)})"
        assert 0 in metrics[tags[0]] and steps[-1] in metrics[tags[0]], f"stage {stage}: {tags[0]} not at start and end"
    moved = [s for s in steps if metrics["critic/advantages/max"][s] > 0 or metrics["critic/advantages/min"][s] < 0]
    assert moved or not need_advantage, (
        f"stage {stage}: every advantage was zero in every step (constant rewards within every group)"
    )
    return found


def check_two_image_prompts(evidence: StageEvidence, expected: set[int], stage: int) -> None:
    """verl's prompt lengths (what reached vLLM, image tokens included) are the HF processor's for two images."""
    for step in evidence.steps:
        seen = {evidence.metrics["prompt_length/min"][step], evidence.metrics["prompt_length/max"][step]}
        assert seen <= expected, (
            f"stage {stage} step {step}: prompt lengths {sorted(seen)}, HF processor {sorted(expected)}"
        )


def check_served_weights(evidence: StageEvidence, stage: int) -> None:
    """vLLM served the actor's weights at every step: verl's own comparison of the rollout's token probabilities
    with the actor's recomputation of them stays at float rounding."""
    for step in evidence.steps:
        diff = evidence.metrics["training/rollout_probs_diff_max"][step]
        assert diff < MAX_PROBS_DIFF, (
            f"stage {stage} step {step}: rollout vs actor token probabilities differ by up to {diff:.3g} "
            f"(> {MAX_PROBS_DIFF}): vLLM did not serve the actor's weights"
        )


def check_syncs(exp: Path, init_weights: Path, stage: int, steps: int) -> list[Path]:
    """The first sync is the stage's initial weights; the last is the stage's merged checkpoint, which differs
    from the initial weights (training changed them)."""
    found = syncs(exp)
    assert len(found) >= steps, f"stage {stage}: {len(found)} weight syncs for {steps} steps"
    init = load(init_weights)
    assert mismatches(load(found[0]), init) == 0, (
        f"stage {stage}: the first sync is not its initial weights {init_weights}"
    )
    final = load(merged(exp))
    assert mismatches(load(found[-1]), final) == 0, f"stage {stage}: the last sync is not the merged checkpoint"
    assert mismatches(init, final) > 0, f"stage {stage}: the merged weights equal the initial ones (at bf16)"
    return found


# ------------------------------------------------------------------------------------ LoRA, dynamic sampling, live

# low_var_kl (k3) is about half the mean squared log-ratio: at 1e-3 the RMS token log-ratio between the actor and
# its adapter-off reference is ~0.045, so an adapter vLLM did not serve would move some sampled token's
# probability by far more than MAX_PROBS_DIFF: the served-weights check then means something for LoRA
MIN_LORA_KL = 1e-3


def check_lora_stage(exp: Path, init_weights: Path, evidence: StageEvidence, stage: int) -> None:
    """A tuning=lora stage: vLLM served the adapter (the served-weights check, on a policy the adapter moved), and the
    merge is the initial weights with the adapter folded into the language model's linear layers only."""
    from recipes.dig.lora import ADAPTER_DIR, FOLDED

    check_served_weights(evidence, stage)
    last = evidence.steps[-1]
    kl = evidence.metrics["actor/kl_loss"][last]
    assert kl > MIN_LORA_KL, f"stage {stage}: the adapter moved the policy too little to tell (kl {kl:.3g})"
    final = merged(exp)
    assert (final / FOLDED).is_file() and (final / ADAPTER_DIR / "adapter_model.safetensors").is_file(), (
        f"stage {stage}: {final} is not a folded LoRA merge"
    )
    init, weights = load(init_weights), load(final)
    assert sorted(init) == sorted(weights), f"stage {stage}: the merge's tensors are not the initial model's"
    changed = {k for k in init if mismatches({k: init[k]}, {k: weights[k]}) > 0}
    adapted = json.loads((final / FOLDED).read_text())["modules"]
    assert changed, f"stage {stage}: the folded merge equals the initial weights (at bf16)"
    frozen = sorted(k for k in changed if "visual" in k or not k.endswith("proj.weight"))
    assert not frozen, f"stage {stage}: LoRA changed weights outside the language model's linear layers: {frozen[:3]}"
    assert len(changed) <= adapted, f"stage {stage}: {len(changed)} tensors changed, {adapted} had adapters"


def check_dynamic_sampling(evidence: StageEvidence, stage: int) -> int:
    """Dynamic sampling ran: verl logged its evicted-group count; returns the groups evicted over the stage."""
    evicted = evidence.metrics.get("training/filter_groups/evicted_samples", {})
    assert evicted, (
        f"stage {stage}: no training/filter_groups/evicted_samples logged (every group had spread, or dynamic "
        "sampling was off)"
    )
    return int(sum(evicted.values()))


def check_live(out_dir: Path, model: str, stage: int, evidence: StageEvidence) -> list[int]:
    """recipes/dig/live.py drew one picture per validation of the stage, and its component curves equal verl's own
    validation means (over every answer: verl averages per prompt, then over prompts of equal n)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from recipes.dig import live

    folder = Path(out_dir) / "checkpoints" / "tensorboard" / "dig" / f"{model}_stage{stage}"
    pictures: list[int] = []
    for events in sorted(folder.glob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"images": 0})
        acc.Reload()
        if live.PICTURE_TAG in acc.Tags()["images"]:
            pictures += [event.step for event in acc.Images(live.PICTURE_TAG)]
    validations = sorted(
        next(values for tag, values in evidence.metrics.items() if re.fullmatch(r"val-aux/dig/f1/mean@\d+", tag))
    )
    assert sorted(pictures) == validations, (
        f"stage {stage}: pictures at steps {sorted(pictures)}, validations at {validations} (one picture each)"
    )
    for key, name in live.CURVES.items():
        kind = "core" if key == "acc" else "aux"
        verl_tag = next(t for t in evidence.metrics if re.fullmatch(rf"val-{kind}/dig/{key}/mean@\d+", t))
        ours = evidence.metrics.get(live.CURVE_PREFIX + name, {})
        assert sorted(ours) == validations, f"stage {stage}: {live.CURVE_PREFIX + name} at steps {sorted(ours)}"
        for step in validations:
            assert abs(ours[step] - evidence.metrics[verl_tag][step]) < 1e-4, (
                f"stage {stage} step {step}: {live.CURVE_PREFIX + name}={ours[step]} but verl's {verl_tag}="
                f"{evidence.metrics[verl_tag][step]}"
            )
    return validations
