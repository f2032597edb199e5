"""eval.dig: scoring through the reward, aggregation per K / per type, the CLI and its outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dig_common.models import load_model_spec
from eval import dig
from eval.options import generation_options
from eval.scoring import reward_knobs, score_response
from reward_fns import geometry
from reward_fns.dig_reward import compute_score

W, H = 480, 320
# pair_id -> (boxes in pixels, types)
PAIRS = {
    "p1": ([[10, 20, 60, 80]], ["color"]),
    "p2": ([[100, 100, 150, 160], [300, 40, 380, 120]], ["color", "added"]),
    "p3": ([], []),  # no-difference pair
}


def gt_json(boxes, types) -> str:
    return json.dumps({"boxes": boxes, "width": W, "height": H, "types": types})


def write_parquet(path, pairs=PAIRS):
    rows = []
    for i, (pid, (boxes, types)) in enumerate(pairs.items()):
        extra = {"split": "test", "index": i, "pair_id": pid, "stage": 0, "num_differences": len(boxes)}
        rows.append(
            {
                "data_source": "dig",
                "prompt": [{"role": "user", "content": "<image><image>Find all differences."}],
                "ability": "grounding",
                "reward_model": {"style": "rule", "ground_truth": gt_json(boxes, types)},
                "extra_info": {**extra, "types": types, "width": W, "height": H},
            }
        )
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def answer(boxes_px, spec) -> str:
    """The boxes in the model's own frame, as a model would write them."""
    frame = dict(factor=spec.resize_factor, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
    model_boxes = geometry.from_pixels(boxes_px, spec.coord_mode, W, H, **frame).round(2).tolist()
    body = json.dumps([{"bbox_2d": b, "label": "diff"} for b in model_boxes])
    return ("<think>looked</think>" if spec.require_think else "") + f"```json\n{body}\n```"


@pytest.mark.parametrize("model", ["qwen3_vl_8b_thinking", "qwen2_5_vl_7b"])
def test_gt_as_answer_scores_perfectly_in_each_frame(tmp_path, model):
    spec = load_model_spec(model)
    data = write_parquet(tmp_path / "test.parquet")
    preds = {pid: answer(boxes, spec) for pid, (boxes, _) in PAIRS.items()}
    samples = dig.score_rows(dig.read_rows(data, dig.SCORE_COLUMNS), preds, reward_knobs(spec))
    results = dig.aggregate(samples)
    for key in ("precision", "recall", "f1", "count_accuracy", "format_rate"):
        assert results["overall"][key] == pytest.approx(1.0), key
    assert results["overall"]["miou"] > 0.98
    assert results["per_type"]["added"]["recall"] == 1.0
    assert results["no_difference"] == {"n": 1, "hallucination_rate": 0.0, "format_fail_rate": 0.0}


def test_score_response_agrees_with_compute_score():
    spec = load_model_spec("qwen2_5_vl_7b")
    knobs = reward_knobs(spec)
    gt = gt_json(*PAIRS["p2"])
    responses = [
        answer(PAIRS["p2"][0], spec),
        answer([[100, 100, 150, 160]], spec),
        answer([[0, 0, 5, 5], [100, 100, 150, 160], [300, 40, 380, 120]], spec),
        "no boxes here",
        "[[10, 10, 5, 5]]",
        "[]",
    ]
    for response in responses:
        scored = score_response(response, gt, knobs)
        reward = compute_score("dig", response, gt, None, **knobs)
        assert reward.pop("reward_error") == 0.0  # the training-only key: eval reports errors in its own way
        assert scored.metrics == pytest.approx(reward), response
        assert (scored.error is None) == (scored.metrics["format"] == 1.0)


def test_aggregation_by_k_type_and_hallucination():
    spec = load_model_spec("qwen3_vl_8b_thinking")
    rows = [{"reward_model": {"ground_truth": gt_json(*PAIRS[p])}, "extra_info": {"pair_id": p}} for p in PAIRS]
    preds = {
        "p1": answer(PAIRS["p1"][0], spec),  # exact
        "p2": answer([[100, 100, 150, 160]], spec),  # finds the colour change, misses the added object
        "p3": answer([[5, 5, 50, 50]], spec),  # hallucinates on the no-difference pair
    }
    results = dig.aggregate(dig.score_rows(rows, preds, reward_knobs(spec)))
    assert results["per_k"]["1"]["recall"] == 1.0
    assert results["per_k"]["2"]["recall"] == pytest.approx(0.5)
    assert results["per_k"]["2"]["precision"] == pytest.approx(1.0)
    assert results["per_k"]["2"]["count_accuracy"] == 0.0
    assert results["per_type"]["color"]["n"] == 2 and results["per_type"]["color"]["recall"] == 1.0
    assert results["per_type"]["added"]["recall"] == 0.0 and results["per_type"]["added"]["n_pairs"] == 1
    assert results["no_difference"]["hallucination_rate"] == 1.0
    # overall recall is the mean over pairs: (1 + 0.5 + 0) / 3 (a hallucination on K = 0 has recall 0)
    assert results["overall"]["recall"] == pytest.approx(0.5)
    assert results["overall"]["count_accuracy"] == pytest.approx(1 / 3)
    table = dig.markdown(results)
    assert "| K = 2 | 1 | 100.0 | 50.0 |" in table
    assert "hallucination rate 100.0" in table
    # change types: box-level and pair-level columns apart. "added": its one box missed (box recall 0), its one
    # pair p2 answered with one right box of two (pair precision 100, recall 50, F1 66.7): no row mixes levels
    assert results["per_type"]["added"]["pair_recall"] == pytest.approx(0.5)
    assert (
        "| change type | GT boxes | box recall | box mIoU | pairs with it | pair precision | pair recall | pair F1 |"
        in table
    )
    assert "| added | 1 | 0.0 | 0.0 | 1 | 100.0 | 50.0 | 66.7 | 0.0 |" in table
    # colour: both boxes found (box recall 100); pairs p1 (exact) and p2 (half): pair recall (1 + 0.5) / 2
    assert "| color | 2 | 100.0 | 100.0 | 2 | 100.0 | 75.0 | 83.3 | 50.0 |" in table
    assert "type: " not in table


def test_cli_writes_results_table_and_samples(tmp_path):
    spec = load_model_spec("qwen3_vl_8b_thinking")
    data = write_parquet(tmp_path / "test.parquet")
    preds = tmp_path / "answers.jsonl"
    preds.write_text(
        "".join(json.dumps({"pair_id": p, "response": answer(b, spec)}) + "\n" for p, (b, _) in PAIRS.items())
    )
    out = tmp_path / "res" / "results.json"
    assert (
        dig.main(["--data", str(data), "--predictions", str(preds), "--model", spec.model_name, "--out", str(out)]) == 0
    )
    results = json.loads(out.read_text())
    assert set(results) >= {"overall", "per_k", "per_type", "no_difference", "markdown", "reward_kwargs"}
    for section in [results["overall"], *results["per_k"].values(), *results["per_type"].values()]:
        assert set(dig.METRIC_KEYS) | {"n"} <= set(section)
    assert results["overall"]["f1"] == pytest.approx(1.0)
    assert (tmp_path / "res" / "results.md").read_text().startswith("| subset |")
    samples = [json.loads(x) for x in (tmp_path / "res" / "results.samples.jsonl").read_text().splitlines()]
    assert [s["pair_id"] for s in samples] == list(PAIRS)
    assert np.allclose(samples[1]["pred_boxes"], PAIRS["p2"][0], atol=1.0)


def test_cli_rejects_bad_predictions(tmp_path, capsys):
    data = write_parquet(tmp_path / "test.parquet")
    # the default model thinks: "[]" without </think> fails format, which --allow-missing rows share
    out = str(tmp_path / "r.json")
    partial = tmp_path / "partial.jsonl"
    partial.write_text(json.dumps({"pair_id": "p1", "response": "<think>ok</think>[]"}) + "\n")

    def error(*argv) -> str:
        assert dig.main(["--data", str(data), "--out", out, *argv]) == 2
        return capsys.readouterr().err

    assert "2 of 3 pairs have no prediction" in error("--predictions", str(partial))
    assert dig.main(["--data", str(data), "--predictions", str(partial), "--out", out, "--allow-missing"]) == 0
    assert json.loads(Path(out).read_text())["overall"]["format_rate"] == pytest.approx(1 / 3)
    stray = tmp_path / "stray.jsonl"
    stray.write_text(json.dumps({"pair_id": "nope", "response": "[]"}) + "\n")
    assert "not in --data" in error("--predictions", str(stray), "--allow-missing")
    twice = tmp_path / "twice.jsonl"
    twice.write_text((json.dumps({"pair_id": "p1", "response": "[]"}) + "\n") * 2)
    assert "appears twice" in error("--predictions", str(twice), "--allow-missing")
    assert "unknown reward knob" in error("--predictions", str(partial), "--reward-kwargs", '{"iou": 1}')


def test_cli_reports_mean_and_spread_over_samples_and_the_truncation_rate(tmp_path):
    """Two answers per pair (as eval.backends writes them): the main sections pool both, ``sampling`` holds each
    sample's overall numbers with mean +- std, ``truncation`` counts thoughts that never closed or hit the limit."""
    spec = load_model_spec("qwen3_vl_8b_thinking")
    data = write_parquet(tmp_path / "test.parquet")
    preds = tmp_path / "answers.jsonl"
    lines = []
    for pid, (boxes, _) in PAIRS.items():
        exact = answer(boxes, spec)
        second = "<think>the cube on the left is" if pid == "p1" else exact  # cut mid-thought
        lines.append(
            {"pair_id": pid, "response": exact, "responses": [exact, second], "truncated": [False, pid == "p1"]}
        )
    preds.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = tmp_path / "res" / "results.json"
    assert (
        dig.main(["--data", str(data), "--predictions", str(preds), "--model", spec.model_name, "--out", str(out)]) == 0
    )
    results = json.loads(out.read_text())
    assert results["sampling"]["n"] == 2
    assert [s["f1"] for s in results["sampling"]["per_sample"]] == pytest.approx([1.0, 2 / 3])
    assert results["sampling"]["mean"]["f1"] == pytest.approx(5 / 6)
    assert results["sampling"]["std"]["f1"] == pytest.approx(1 / 6)
    assert results["overall"]["f1"] == pytest.approx(5 / 6) and results["overall"]["n"] == 6  # pairs x samples
    sixth = pytest.approx(1 / 6)
    assert results["truncation"] == {"n": 6, "rate": sixth, "hit_limit": sixth, "unclosed_think": sixth}
    assert results["decoding"] is None  # answers made elsewhere: their decoding is not known here
    md = (tmp_path / "res" / "results.md").read_text()
    assert "Mean ± std over the 2 samples: F1 83.3 ± 16.7" in md
    assert "Truncated answers: 16.7 % (cut at the token limit 16.7 %; no closed </think> 16.7 %)." in md
    samples = [json.loads(x) for x in (tmp_path / "res" / "results.samples.jsonl").read_text().splitlines()]
    assert [(s["pair_id"], s["sample"]) for s in samples][:4] == [("p1", 0), ("p2", 0), ("p3", 0), ("p1", 1)]

    lines[0]["responses"] = lines[0]["responses"][:1]
    lines[0]["truncated"] = [False]
    preds.write_text("".join(json.dumps(x) + "\n" for x in lines))
    with pytest.raises(ValueError, match="different numbers of samples"):
        dig.read_sampled_predictions(preds)


def test_truncation_of_plain_answers_counts_unclosed_thoughts_only():
    responses = {"a": ["<think>x</think>[]"], "b": ["<think>never ends"]}
    flags = {"a": [None], "b": [None]}
    expected = {"n": 2, "rate": 0.5, "hit_limit": None, "unclosed_think": 0.5}
    assert dig.truncation_summary(responses, flags, require_think=True) == expected
    assert dig.truncation_summary(responses, flags, require_think=False)["rate"] == 0.0


def test_generation_decodes_with_the_model_file_by_default(tmp_path, capsys):
    """eval.dig hands the backend the model file's decoding: no overrides, the file's n samples; a decoding the
    model file cannot do fails before any checkpoint is looked at."""
    data = write_parquet(tmp_path / "test.parquet")
    argv = ["--data", str(data), "--model-path", str(tmp_path / "ckpt"), "--backend", "hf"]
    args = dig.build_parser().parse_args([*argv, "--out", str(tmp_path / "r.json")])
    assert generation_options(args, args.samples) == {
        "max_new_tokens": None,
        "temperature": None,
        "tensor_parallel_size": 1,
        "seed": None,
        "n": None,
    }
    # greedy: four identical samples refused, naming the cause (the checkpoint folder does not even exist)
    assert dig.main([*argv, "--out", str(tmp_path / "r.json"), "--model", "qwen2_5_vl_7b", "--samples", "4"]) == 2
    err = capsys.readouterr().err
    assert (
        err == "python -m eval.dig: error: greedy decoding (temperature 0) with n=4: the samples would be identical\n"
    )


def test_below_threshold_partners_and_format_failures_in_aggregation():
    """A Hungarian partner below iou_threshold is not a hit; a failed format is never a correct count."""
    spec = load_model_spec("qwen2_5_vl_7b")
    pairs = {
        "third": ([[100, 100, 160, 160]], ["color"]),  # answered [130,100,190,160]: IoU 1800 / 5400 = 1/3
        "exact": ([[300, 40, 380, 120]], ["added"]),
        "empty_garbage": ([], []),  # K = 0 answered with no list at all: format fails
        "k1_garbage": ([[10, 20, 60, 80]], ["color"]),  # K = 1, format fails
        # only the second GT box is found: its type gets the hit, not the first box's (pred 0 pairs with GT 1)
        "second_only": ([[10, 20, 60, 80], [300, 200, 380, 300]], ["color", "added"]),
    }
    rows = [{"reward_model": {"ground_truth": gt_json(*pairs[p])}, "extra_info": {"pair_id": p}} for p in pairs]
    preds = {
        "third": answer([[130, 100, 190, 160]], spec),
        "exact": answer(pairs["exact"][0], spec),
        "empty_garbage": "garbage",
        "k1_garbage": "garbage",
        "second_only": answer([[300, 200, 380, 300]], spec),
    }
    samples = dig.score_rows(rows, preds, reward_knobs(spec))
    assert [s["metrics"]["format"] for s in samples] == [1.0, 1.0, 0.0, 0.0, 1.0]
    assert [(p["pred"], p["gt"], p["match"]) for p in samples[4]["pairs"]] == [(0, 1, True)]
    results = dig.aggregate(samples)
    color = results["per_type"]["color"]
    # three colour boxes: one has a partner at IoU 1/3 (assigned, not matched), two none
    assert color["n"] == 3 and color["recall"] == 0.0
    assert color["miou"] == pytest.approx(1 / 3, abs=0.01)  # over the boxes that had a partner
    added = results["per_type"]["added"]
    assert (added["n"], added["recall"], added["n_pairs"]) == (2, 1.0, 2)
    # count accuracy: "third" and "exact" have N == K; both garbage answers count as wrong, K = 0 included
    assert results["per_k"]["0"]["count_accuracy"] == 0.0
    assert results["overall"]["count_accuracy"] == pytest.approx(2 / 5)
    assert results["per_k"]["1"]["count_accuracy"] == pytest.approx(2 / 3)
    assert results["no_difference"] == {"n": 1, "hallucination_rate": 0.0, "format_fail_rate": 1.0}
    assert results["overall"]["format_rate"] == pytest.approx(3 / 5)
