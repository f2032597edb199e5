"""eval.refcoco on a fixture in the lmms-lab/RefCOCO parquet layout, built here (no download)."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dig_common.models import load_model_spec
from eval import refcoco
from eval.scoring import reward_knobs
from reward_fns import geometry

SIZE = 112  # a multiple of 28 inside Qwen2.5-VL's bounds: its resized frame equals the original pixels


def png(width=SIZE, height=SIZE) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(buf, format="PNG")
    return buf.getvalue()


def write_split(root, folder, split, rows):
    path = root / folder / "data" / f"{split}-00000-of-00001.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(
        [
            {
                "question_id": qid,
                "image": {"bytes": png(), "path": None},
                "question": "Please carefully observe the area circled in the image and come up with a caption.",
                "answer": expressions,
                "segmentation": [0.0] * 8,
                "bbox": bbox,
                "iscrowd": 0,
                "file_name": f"COCO_train2014_{qid}.jpg",
            }
            for qid, expressions, bbox in rows
        ]
    )
    pq.write_table(table, path)


@pytest.fixture
def root(tmp_path):
    # bbox is COCO [x, y, w, h]
    write_split(tmp_path, "RefCOCO", "val", [("1", ["left cat", "cat on the left"], [10, 10, 40, 40])])
    write_split(tmp_path, "RefCOCOg", "test", [("7", ["the big dog"], [0, 56, 112, 56])])
    return tmp_path


def test_reads_the_layout_one_sample_per_expression(root):
    samples = list(refcoco.iter_samples(root, "refcoco", "val"))
    assert [s.id for s in samples] == ["refcoco:val:1:0", "refcoco:val:1:1"]
    assert samples[1].expression == "cat on the left"
    assert samples[0].gt_box == [10, 10, 50, 50] and (samples[0].width, samples[0].height) == (SIZE, SIZE)
    with pytest.raises(FileNotFoundError, match="hf download lmms-lab-encoder/RefCOCOplus"):
        refcoco.split_files(root, "refcoco+", "val")
    assert len(refcoco.parse_splits("all")) == 8
    with pytest.raises(ValueError, match="not <dataset>:<split>"):
        refcoco.parse_splits("coco:val")


def test_both_acc_conventions_at_exactly_half_iou():
    knobs = reward_knobs(load_model_spec("qwen2_5_vl_7b"))
    gt = [10, 10, 50, 50]
    half = refcoco.score_rec('[{"bbox_2d": [10, 10, 50, 30]}]', gt, SIZE, SIZE, knobs)  # IoU = 800 / 1600
    assert half["iou"] == 0.5
    exact = refcoco.score_rec("[[10, 10, 50, 50], [0, 0, 5, 5]]", gt, SIZE, SIZE, knobs)  # first box counts
    broken = refcoco.score_rec("the cat", gt, SIZE, SIZE, knobs)
    assert exact["iou"] == 1.0 and broken == {"iou": 0.0, "format": 0.0, "pred_box": None, "error": broken["error"]}
    stats = refcoco.summarize([half, exact, broken])
    assert stats["acc50_ge"] == pytest.approx(2 / 3) and stats["acc50_gt"] == pytest.approx(1 / 3)
    assert stats["miou"] == pytest.approx(0.5) and stats["format_rate"] == pytest.approx(2 / 3)


def test_score_rec_on_a_non_square_image():
    """480 x 320 in Qwen3-VL's rel1000 frame: x scales by W, y by H, a box past the bottom is clipped to H."""
    knobs = reward_knobs(load_model_spec("qwen3_vl_8b_thinking"))
    gt = [120, 160, 240, 320]
    answer = '<think>x</think>[{"bbox_2d": [250, 500, 500, 1200]}]'  # y1 = 1.2 H
    scored = refcoco.score_rec(answer, gt, 480, 320, knobs)
    assert scored["pred_box"] == pytest.approx(gt) and scored["iou"] == pytest.approx(1.0)
    assert refcoco.score_rec(answer, gt, 320, 480, knobs)["iou"] < 0.5  # the same numbers on the transposed image


def test_prompt_is_in_the_models_frame(root):
    sample = next(refcoco.iter_samples(root, "refcoco", "val"))
    for name, phrase in (("qwen3_vl_8b_thinking", "0-1000 scale"), ("qwen2_5_vl_7b", "image as you see it")):
        spec = load_model_spec(name)
        [message] = refcoco.rec_request(sample, spec)
        image, text = message["content"]
        assert image["max_pixels"] == spec.max_pixels and image["image"].size == (SIZE, SIZE)
        assert '"left cat"' in text["text"] and phrase in text["text"]


def test_cli_scores_gt_in_native_frame(root, tmp_path, capsys):
    spec = load_model_spec("qwen3_vl_8b_thinking")
    answers = []
    for dataset, split in (("refcoco", "val"), ("refcocog", "test")):
        for s in refcoco.iter_samples(root, dataset, split):
            box = geometry.from_pixels([s.gt_box], spec.coord_mode, s.width, s.height)[0].tolist()
            answers.append({"id": s.id, "response": f'<think>found it</think>[{{"bbox_2d": {box}}}]'})
    answers[1]["response"] = "<think>no idea</think>"  # the second expression fails
    preds = tmp_path / "answers.jsonl"
    preds.write_text("".join(json.dumps(a) + "\n" for a in answers))
    out = tmp_path / "rc" / "refcoco.json"
    argv = ["--refcoco-dir", str(root), "--splits", "refcoco:val,refcocog:test", "--predictions", str(preds)]
    argv += ["--model", spec.model_name, "--out", str(out)]
    assert refcoco.main(argv) == 0
    capsys.readouterr()
    results = json.loads(out.read_text())
    assert results["splits"]["refcoco:val"]["acc50_ge"] == 0.5 and results["splits"]["refcoco:val"]["n"] == 2
    assert results["splits"]["refcocog:test"]["miou"] == pytest.approx(1.0)
    assert "| refcocog:test | 1 | 100.0 | 100.0 |" in results["markdown"]
    preds.write_text("".join(json.dumps(a) + "\n" for a in answers[:1]))
    assert refcoco.main(argv) == 2
    assert capsys.readouterr().err == f"python -m eval.refcoco: error: {preds}: no answer for refcoco:val:1:1\n"


def test_cli_generates_with_hf_backend_and_resumes(root, tmp_path):
    """The path a user runs on a checkpoint, with a tiny random Qwen2.5-VL saved offline."""
    from tiny_qwen import save_tiny_checkpoint

    spec = load_model_spec("qwen2_5_vl_3b")
    ckpt = save_tiny_checkpoint("qwen2_5_vl", tmp_path / "ckpt")
    out = tmp_path / "gen" / "refcoco.json"
    argv = ["--refcoco-dir", str(root), "--splits", "refcoco:val,refcocog:test", "--model", spec.model_name]
    argv += ["--model-path", str(ckpt), "--backend", "hf", "--max-new-tokens", "5", "--out", str(out)]
    assert refcoco.main(argv) == 0
    predictions = (tmp_path / "gen" / "refcoco.predictions.jsonl").read_text().splitlines()
    expected = ["refcoco:val:1:0", "refcoco:val:1:1", "refcocog:test:7:0"]
    assert sorted(json.loads(p)["id"] for p in predictions) == expected
    results = json.loads(out.read_text())
    assert sum(s["n"] for s in results["splits"].values()) == 3
    assert refcoco.main(argv) == 0  # nothing left to generate
    assert (tmp_path / "gen" / "refcoco.predictions.jsonl").read_text().splitlines() == predictions
