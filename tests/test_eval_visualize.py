"""eval.visualize: tiles show GT and predictions where they are; works on eval.dig samples and on verl's dump."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from dig_common.models import load_model_spec
from eval import dig, visualize
from reward_fns import geometry
from reward_fns.scoring import failed_metrics

W, H = 100, 50
GT_BOX = [20, 10, 40, 30]
SPEC = load_model_spec("qwen3_vl_8b_thinking")


def png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (W, H), color).save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(path):
    gt = json.dumps({"boxes": [GT_BOX], "width": W, "height": H, "types": ["color"]})
    image = {"bytes": png((0, 0, 255)), "min_pixels": SPEC.min_pixels, "max_pixels": SPEC.max_pixels}
    extra = {"split": "val", "index": 0, "pair_id": "pair0", "stage": 1, "num_differences": 1}
    rows = [
        {
            "data_source": "dig",
            "prompt": [{"role": "user", "content": "<image><image>Find all differences."}],
            "images": [image, dict(image)],
            "ability": "grounding",
            "reward_model": {"style": "rule", "ground_truth": gt},
            "extra_info": {**extra, "types": ["color"], "width": W, "height": H},
        }
    ]
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path, gt


def response(boxes_px) -> str:
    boxes = geometry.from_pixels(boxes_px, SPEC.coord_mode, W, H).tolist()
    return "<think>x</think>" + json.dumps([{"bbox_2d": b} for b in boxes])


def tile_pixel(tile: Image.Image, x: float, y: float, image: str) -> tuple[int, int, int]:
    scale = visualize.TILE_HEIGHT / H
    offset = 0 if image == "A" else round(W * scale) + 4
    return tile.getpixel((offset + round(x * scale), round(y * scale)))


def test_gallery_from_eval_samples(tmp_path):
    data, _ = write_parquet(tmp_path / "val.parquet")
    preds = tmp_path / "p.jsonl"
    # one matched prediction on the GT box, one unmatched far away
    preds.write_text(json.dumps({"pair_id": "pair0", "response": response([GT_BOX, [70, 5, 90, 45]])}) + "\n")
    out = tmp_path / "r.json"
    assert (
        dig.main(["--data", str(data), "--predictions", str(preds), "--model", SPEC.model_name, "--out", str(out)]) == 0
    )
    argv = ["--samples", str(tmp_path / "r.samples.jsonl"), "--data", str(data), "--out-dir", str(tmp_path / "g")]
    assert visualize.main(argv) == 0
    sheet = Image.open(tmp_path / "g" / "contact_sheet.png")
    tile = Image.open(tmp_path / "g" / "tiles" / "0000.png").convert("RGB")
    assert sheet.width >= tile.width and sheet.height >= tile.height
    # GT (green) on A's box edge; the prediction is drawn over the GT on B (red); the image itself is blue
    assert tile_pixel(tile, 30, 10, "A") == visualize.GT_COLOR
    assert tile_pixel(tile, 30, 10, "B") == visualize.PRED_COLOR
    assert tile_pixel(tile, 30, 20, "A") == (0, 0, 255)
    assert tile_pixel(tile, 70, 25, "A") == (0, 0, 255)  # predictions are not drawn on A
    assert tile_pixel(tile, 71, 5, "B") == visualize.PRED_COLOR  # first dash of the unmatched box
    assert tile_pixel(tile, 72.5, 5, "B") == (0, 0, 255)  # ... and the gap after it
    page = (tmp_path / "g" / "index.html").read_text()
    assert "pair0" in page and "tiles/0000.png" in page and "types color" in page


def test_gallery_counts_pairs_and_samples_apart(tmp_path, capsys):
    """4 pairs x 4 samples are 16 answers of 4 pairs, each tile naming its sample."""
    samples = tmp_path / "r.samples.jsonl"
    gt = {"pred_boxes": [], "gt_boxes": [GT_BOX], "pairs": [], "width": W, "height": H, "num_gt": 1}
    metrics = failed_metrics(1)  # the nine metrics of an answer whose format failed
    lines = [{"pair_id": f"p{p}", "sample": i, "metrics": metrics, **gt} for i in range(4) for p in range(4)]
    samples.write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert visualize.main(["--samples", str(samples), "--out-dir", str(tmp_path / "g")]) == 0
    assert capsys.readouterr().out.startswith("eval.visualize: 16 answers (4 pairs x 4 samples) -> ")
    page = (tmp_path / "g" / "index.html").read_text()
    assert "<h3>p0 #1</h3>" in page and "<h3>p3 #4</h3>" in page
    assert visualize.count_text(lines[:4]) == "4 pairs"
    assert visualize.count_text(lines[:1]) == "1 pair"


@pytest.mark.verl
def test_gallery_from_verl_validation_dump(tmp_path):
    """The dump is written by verl's own writer, so a format change in verl breaks this test."""
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    data, gt = write_parquet(tmp_path / "val.parquet")
    outputs = [response([GT_BOX]), "<think>hmm</think> I see nothing [oops"]
    dump_dir = tmp_path / "val_dump"
    PPOTrainer._write_generations(
        inputs=["user prompt", "user prompt"],
        outputs=outputs,
        gts=[gt, gt],
        scores=[1.0, 0.0],
        reward_extra_infos_dict={"acc": [1.0, 0.0], "f1": [1.0, 0.0], "uid": ["u_0_0", "u_0_1"]},
        dump_path=str(dump_dir),
        global_steps=40,
    )
    dump = dump_dir / "40.jsonl"
    knobs = dig.reward_knobs(SPEC)
    samples = visualize.samples_from_verl_dump(dump, knobs, visualize.load_images(data)[1])
    assert [s["pair_id"] for s in samples] == ["pair0", "pair0"]  # joined to the parquet by ground truth
    assert samples[0]["metrics"]["f1"] == 1.0 and samples[1]["error"]
    assert samples[0]["step"] == 40
    argv = ["--verl-dump", str(dump), "--data", str(data), "--model", SPEC.model_name]
    argv += ["--out-dir", str(tmp_path / "g"), "--sort", "worst"]
    assert visualize.main(argv) == 0
    page = (tmp_path / "g" / "index.html").read_text()
    assert page.index("format failed") < page.index("F1 1.00")  # worst first


def test_rejects_other_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"pair_id": "x"}) + "\n")
    with pytest.raises(ValueError, match="not an eval.dig samples line"):
        visualize.samples_from_eval(bad)
    with pytest.raises(ValueError, match="not a verl generations dump line"):
        visualize.samples_from_verl_dump(bad, dig.reward_knobs(SPEC), {})


def test_one_box_convention_in_gallery_and_eval_tiles():
    """Boxes are [x0, y0, x1, y1] with x1/y1 exclusive: [10, 10, 20, 20] covers pixels 10..19, so both
    galleries outline column/row 19 and leave 20 alone, at any scale."""
    from data_prep.gallery import draw_boxes

    black = Image.new("RGB", (40, 40))
    for scale in (1.0, 2.0):
        drawn = draw_boxes(black, [{"box": [10, 10, 20, 20], "color": (255, 0, 0)}], scale=scale, width=1)
        last, outside = round(20 * scale) - 1, round(20 * scale)
        assert drawn.getpixel((last, last)) == drawn.getpixel((round(10 * scale), last)) == (255, 0, 0)
        assert drawn.getpixel((outside, outside)) == drawn.getpixel((outside, last)) == (0, 0, 0)
    sample = {
        "pair_id": "p",
        "num_gt": 1,
        "width": W,
        "height": H,
        "gt_boxes": [GT_BOX],
        "pred_boxes": [],
        "pairs": [],
        "metrics": {"f1": 0.0, "miou": 0.0, "num_pred": 0.0},
    }
    tile = visualize.render_tile(sample, (png((0, 0, 255)), png((0, 0, 255))))
    scale = visualize.TILE_HEIGHT / H
    right = round(GT_BOX[2] * scale)  # the first column past the box
    assert tile.getpixel((right - 1, round(20 * scale))) == visualize.GT_COLOR
    assert tile.getpixel((right, round(20 * scale))) == (0, 0, 255)


def test_generation_gallery_draws_the_record_boxes(tmp_path):
    """data_prep.gallery on generator-format pairs (synthetic, no Blender): each GT box is outlined on its
    exclusive edge in the contact sheet."""
    from data_prep.gallery import TYPE_COLORS, make_sheet
    from data_prep.synthetic import write_pairs

    pairs = write_pairs(tmp_path / "pairs", num=1, k=1, seed=1, width=64, height=48)
    record = json.loads(next(pairs.glob("shard_*/*.json")).read_text())
    diff = record["differences"][0]
    x0, y0, x1, y1 = diff["box"]
    sheet = make_sheet(pairs, limit=1, scale=2.0)
    row = 16 + (y0 + y1)  # under the 16 px title bar, image A at scale 2: a row through the box
    color = TYPE_COLORS[diff["type"]]
    assert sheet.getpixel((2 * x1 - 1, row)) == color and sheet.getpixel((2 * x0, row)) == color
    assert sheet.getpixel((2 * x1, row)) != color
