"""recipes.dig.live: verl's validation dumps (written by verl's own writer) become one TensorBoard image per step
and the reward's component curves, read back with TensorBoard's own reader; W&B (offline) gets the same."""

from __future__ import annotations

import io
import json
import random
import struct
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf
from PIL import Image

from dig_common.models import load_model_spec
from eval import visualize
from eval.scoring import reward_knobs
from recipes.dig import live
from recipes.dig.settings import config_defaults
from reward_fns import geometry
from reward_fns.dig_reward import compute_score

pytestmark = pytest.mark.verl

W, H = 100, 50
SPEC = load_model_spec("qwen3_vl_8b_thinking")
KNOBS = reward_knobs(SPEC)
IMAGE_COLOR = (0, 0, 255)
# pair id -> ground-truth boxes (pixels, x1/y1 exclusive); the parquet lists them unsorted
GT = {
    "p3": [[60, 10, 80, 30]],
    "p0": [[20, 10, 40, 30]],
    "p4": [[10, 10, 20, 20], [50, 20, 70, 40]],
    "p1": [[0, 0, 25, 20]],  # at the top-left corner
    "p2": [[75, 30, 100, 50]],  # at the bottom-right corner
}


def png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (W, H), color).save(buf, format="PNG")
    return buf.getvalue()


def gt_string(pair: str) -> str:
    return json.dumps({"boxes": GT[pair], "width": W, "height": H, "types": ["color"] * len(GT[pair])})


def write_parquet(path: Path) -> Path:
    rows = []
    for index, pair in enumerate(GT):
        image = {"bytes": png(IMAGE_COLOR), "min_pixels": SPEC.min_pixels, "max_pixels": SPEC.max_pixels}
        rows.append(
            {
                "data_source": "dig",
                "prompt": [{"role": "user", "content": "<image><image>Find all differences."}],
                "images": [image, dict(image)],
                "ability": "grounding",
                "reward_model": {"style": "rule", "ground_truth": gt_string(pair)},
                "extra_info": {"split": "val", "index": index, "pair_id": pair, "stage": 1, "width": W, "height": H},
            }
        )
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def boxes_json(boxes_px) -> str:
    boxes = geometry.from_pixels(boxes_px, SPEC.coord_mode, W, H).tolist()
    return json.dumps([{"bbox_2d": b} for b in boxes])


# (pair, answer): p0 answered twice (first right, then wrong), several think blocks, edge boxes, a malformed answer
ANSWERS = [
    ("p0", "<think>the mug changed colour</think>" + boxes_json(GT["p0"])),
    ("p0", "<think>not sure</think>" + boxes_json([[70, 5, 90, 45]])),
    ("p1", "<think>corner?</think>\n<think>yes, top-left</think>\n" + boxes_json(GT["p1"])),
    ("p2", "<think>hmm</think> I see nothing [oops"),
    ("p3", "<think>a</think><think>b</think><think>c</think>" + boxes_json(GT["p3"])),
    ("p4", "<think>x</think>[]"),
]
# the means of the reward's keys over these six answers, by hand
EXPECTED = {
    "dig/val/format_rate": 5 / 6,  # only p2's answer fails format
    "dig/val/f1": 3 / 6,  # p0 (first), p1, p3 exact
    "dig/val/precision": 3 / 6,
    "dig/val/recall": 3 / 6,
    "dig/val/mIoU": 3 / 6,
    "dig/val/predicted_boxes": 4 / 6,  # 1 + 1 + 1 + 0 + 1 + 0
    "dig/val/true_boxes": 7 / 6,  # 1 + 1 + 1 + 1 + 1 + 2
    "dig/val/score": 3.2 / 6,  # three perfect answers (1.0), p0's wrong box and p4's empty list (format: 0.1)
    "dig/val/reward_errors": 0.0,
}


def dump_lines(step: int, order_seed: int = 0) -> str:
    """What verl's own writer puts in <step>.jsonl for ANSWERS (rows shuffled by ``order_seed``)."""
    from verl.trainer.ppo.v1.trainer_base import PPOTrainer

    answers = list(ANSWERS)
    random.Random(order_seed).shuffle(answers)
    rewards = [compute_score("dig", text, gt_string(pair), None, **KNOBS) for pair, text in answers]
    extra = {key: [r[key] for r in rewards] for key in rewards[0]}
    extra["reward"] = [r["score"] for r in rewards]
    # verl's keys: {uid}_{sample}_{turn}; p0's two answers are samples 0 and 1 of one uid
    samples = {i: sum(p == pair for p, _ in ANSWERS[:i]) for i, (pair, _) in enumerate(ANSWERS)}
    extra["uid"] = [f"uid{pair}_{samples[ANSWERS.index(a)]}_0" for a in answers for pair in [a[0]]]
    with tempfile.TemporaryDirectory() as scratch:
        PPOTrainer._write_generations(
            inputs=["user\nFind all differences."] * len(answers),
            outputs=[text for _, text in answers],
            gts=[gt_string(pair) for pair, _ in answers],
            scores=[r["score"] for r in rewards],
            reward_extra_infos_dict=extra,
            dump_path=scratch,
            global_steps=step,
        )
        return (Path(scratch) / f"{step}.jsonl").read_text()


def write_dump(dump_dir: Path, step: int, order_seed: int = 0) -> Path:
    dump_dir.mkdir(parents=True, exist_ok=True)
    path = dump_dir / f"{step}.jsonl"
    path.write_text(dump_lines(step, order_seed))
    return path


def watcher(tmp_path: Path, sinks=None, pictures: int = 4) -> live.Watcher:
    data = tmp_path / "val.parquet"
    if not data.exists():
        write_parquet(data)
    sinks = [live.TensorBoardSink(tmp_path / "tb")] if sinks is None else sinks
    return live.Watcher(tmp_path / "validation", sinks, KNOBS, val_files=[data], pictures=pictures, poll_seconds=0.05)


def events(logdir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    return acc


def images(logdir: Path) -> list[tuple[int, Image.Image]]:
    """Every image event of every event file in logdir (EventAccumulator reads one file: count them all)."""
    out = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        acc = events(path)
        for event in acc.Images(live.PICTURE_TAG) if live.PICTURE_TAG in acc.Tags()["images"] else []:
            out.append((event.step, Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB")))
    return sorted(out, key=lambda item: item[0])


def tile_origin(picture: Image.Image, position: int, tiles: int = 4) -> tuple[int, int]:
    """Top-left pixel of tile ``position`` in live's contact sheet (live.COLUMNS per row)."""
    rows = (tiles + live.COLUMNS - 1) // live.COLUMNS
    cell_w, cell_h = picture.width // live.COLUMNS, picture.height // rows
    return (position % live.COLUMNS) * cell_w + 4, (position // live.COLUMNS) * cell_h + 4


def pixel(picture: Image.Image, position: int, x: float, y: float, image: str) -> tuple[int, int, int]:
    """The picture's pixel at (x, y) of the pair's image A or B, in tile ``position``."""
    scale = visualize.TILE_HEIGHT / H
    left, top = tile_origin(picture, position)
    offset = 0 if image == "A" else round(W * scale) + 4
    return picture.getpixel((left + offset + round(x * scale), top + round(y * scale)))


# ----------------------------------------------------------------------------------------------- tests


def test_one_picture_per_step_of_the_same_pairs_and_the_component_means(tmp_path):
    dumps = tmp_path / "validation"
    write_dump(dumps, 0, order_seed=1)
    write_dump(dumps, 5, order_seed=2)  # same answers, another order: the same pairs must be drawn
    w = watcher(tmp_path)
    assert w.poll() == []  # first sight: sizes not known stable yet
    assert w.poll() == [0, 5]
    assert w.poll() == []
    w.stop()

    pictures = images(tmp_path / "tb")
    assert [step for step, _ in pictures] == [0, 5]
    first, second = pictures[0][1], pictures[1][1]
    assert first.tobytes() == second.tobytes()  # same pairs, same answers -> the same picture
    tile = visualize.render_tile(
        visualize.sample_from_verl_row({"output": ANSWERS[0][1], "gts": gt_string("p0")}, KNOBS, "p0"), None
    )
    # 4 tiles of 5 pairs, 2 per row: p0 p1 / p2 p3 (sorted pair ids), not p4
    assert first.size == (2 * (tile.width + 8), 2 * (tile.height + 8))
    # p0's first answer (right) is drawn, not its second: red over the GT edge on B, green on A, image inside
    assert pixel(first, 0, 30, 10, "A") == visualize.GT_COLOR
    assert pixel(first, 0, 30, 10, "B") == visualize.PRED_COLOR
    assert pixel(first, 0, 30, 20, "A") == IMAGE_COLOR
    assert pixel(first, 0, 70, 25, "B") == IMAGE_COLOR  # the second answer's box (left edge x=70) is not drawn
    # p1's box at the top-left corner, p2's at the bottom-right one (its answer failed: no prediction on B)
    assert pixel(first, 1, 0, 0, "A") == visualize.GT_COLOR
    assert pixel(first, 1, 10, 10, "A") == IMAGE_COLOR
    assert pixel(first, 2, 99.7, 49.7, "A") == visualize.GT_COLOR
    assert pixel(first, 2, 99.7, 49.7, "B") == visualize.GT_COLOR
    assert pixel(first, 3, 60, 20, "A") == visualize.GT_COLOR  # p3, answered after three think blocks
    assert pixel(first, 3, 60, 20, "B") == visualize.PRED_COLOR

    acc = events(next((tmp_path / "tb").glob("*.dig_live")))
    assert set(EXPECTED) <= set(acc.Tags()["scalars"])
    for tag, value in EXPECTED.items():
        points = acc.Scalars(tag)
        assert [p.step for p in points] == [0, 5], tag
        assert [p.value for p in points] == pytest.approx([value, value], abs=1e-6), tag


def test_the_curves_are_means_of_the_rows_reward_keys():
    rows = [{"f1": 1.0, "format": 1.0, "num_gt": 2}, {"f1": 0.0, "format": 0.0, "num_gt": 1}, {"f1": 0.5}]
    assert live.curves(rows) == {
        "dig/val/f1": pytest.approx(0.5),
        "dig/val/format_rate": 0.5,
        "dig/val/true_boxes": 1.5,
    }


def test_a_half_written_dump_waits_and_is_logged_once_complete(tmp_path):
    dumps = tmp_path / "validation"
    text = dump_lines(0)
    dumps.mkdir()
    path = dumps / "0.jsonl"
    path.write_text(text[: len(text) // 2])  # mid-line: verl's writer is still going
    w = watcher(tmp_path)
    assert w.poll() == [] and w.poll() == []  # stable size, but the last line is cut
    path.write_text(text)
    assert w.poll() == []  # the size changed since the last look
    assert w.poll() == [0]
    # the next step, cut at a line end and stable: fewer answers than step 0 had, so still being written
    lines = dump_lines(5).splitlines(keepends=True)
    (dumps / "5.jsonl").write_text("".join(lines[:3]))
    assert w.poll() == [] and w.poll() == []
    (dumps / "5.jsonl").write_text("".join(lines))
    assert w.poll() == [] and w.poll() == [5]
    # after training, a dump seen once is taken if it parses
    write_dump(dumps, 10)
    w.stop()
    assert [step for step, _ in images(tmp_path / "tb")] == [0, 5, 10]


def test_a_resumed_run_logs_no_step_twice(tmp_path):
    dumps = tmp_path / "validation"
    write_dump(dumps, 0)
    write_dump(dumps, 5)
    first = watcher(tmp_path)
    first.poll(), first.poll()
    first.stop()
    state = json.loads((dumps / live.STATE_FILE).read_text())
    assert state == {"done": [0, 5], "rows": len(ANSWERS)}
    # the resumed run validates step 5 again (val_before_train), rewriting its dump, then reaches step 10
    write_dump(dumps, 5, order_seed=3)
    write_dump(dumps, 10)
    second = watcher(tmp_path)
    assert second.poll() == [] and second.poll() == [10]
    second.stop()
    assert [step for step, _ in images(tmp_path / "tb")] == [0, 5, 10]
    assert len(list((tmp_path / "tb").glob("*.dig_live"))) == 2


def test_a_broken_dump_line_is_one_log_line_and_the_watcher_goes_on(tmp_path, capsys):
    dumps = tmp_path / "validation"
    lines = dump_lines(0).splitlines(keepends=True)
    lines[2] = '{"input": "user", "output": "<think>\n'  # a line cut short, then more lines
    dumps.mkdir()
    (dumps / "0.jsonl").write_text("".join(lines))
    write_dump(dumps, 5)
    w = watcher(tmp_path)
    w.start()
    w._stop.wait(0.5)  # several polls by the thread
    w.stop()
    assert [step for step, _ in images(tmp_path / "tb")] == [5]
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("[dig.live] step 0")]
    assert len(err) == 1, err  # once, not once per poll
    assert "0.jsonl:3: not a JSON line" in err[0]
    assert 0 not in w.done and w.done == {5}


def test_a_failing_sink_never_stops_the_watcher(tmp_path, capsys):
    class Broken:
        def log(self, *args):
            raise OSError("disk full")

        def close(self):
            pass

    dumps = tmp_path / "validation"
    write_dump(dumps, 0)
    w = watcher(tmp_path, sinks=[Broken()])
    w.poll()
    assert w.poll() == []
    w.stop()
    assert "OSError: disk full" in capsys.readouterr().err
    assert w.done == set()  # not marked done: a later run may still log it


def wandb_records(path: Path):
    """The records of an offline W&B run file (.wandb: W&B's LevelDB-style log of protobuf Records)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, chunks, out = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4 : pos + 7])
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full, last
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            out.append(record)
            chunks = b""
        elif kind == 0:
            break
    return out


def test_wandb_offline_run_gets_the_pictures_and_curves(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    # offline: W&B's own mode, not shared (shared needs the server); online: shared, as a secondary writer
    assert "mode" not in live.wandb_settings().model_fields_set
    shared = live.wandb_settings({"WANDB_MODE": ""})
    assert (shared.mode, shared.x_primary, shared.x_update_finish_state) == ("shared", False, False)
    dumps = tmp_path / "validation"
    write_dump(dumps, 0)
    write_dump(dumps, 5)
    sinks = [live.TensorBoardSink(tmp_path / "tb"), live.WandbSink("dig", "qwen_stage1", "dig0live0test")]
    w = watcher(tmp_path, sinks=sinks)
    w.poll(), w.poll()
    w.stop()
    run_dir = next((tmp_path / "wandb").glob("offline-run-*-dig0live0test"))
    media = sorted((run_dir / "files" / "media" / "images").rglob("*.png"))
    assert len(media) == 2
    tb_picture = images(tmp_path / "tb")[0][1]
    assert all(Image.open(p).convert("RGB").tobytes() == tb_picture.tobytes() for p in media)
    history = []
    for record in wandb_records(next(run_dir.glob("*.wandb"))):
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict = {}
        for item in record.history.item:  # a logged image is a nested record: [key, field]
            key = [item.key] if item.key else list(item.nested_key)
            target = row
            for part in key[:-1]:
                target = target.setdefault(part, {})
            target[key[-1]] = json.loads(item.value_json)
        history.append(row)
    ours = [h for h in history if live.WANDB_STEP_KEY in h]
    assert [h[live.WANDB_STEP_KEY] for h in ours] == [0, 5]
    assert [h["dig/val/f1"] for h in ours] == pytest.approx([0.5, 0.5])
    assert [h["dig/val/predicted_boxes"] for h in ours] == pytest.approx([4 / 6, 4 / 6])
    assert [h[live.PICTURE_TAG]["_type"] for h in ours] == ["image-file"] * 2
    assert sorted(run_dir / "files" / h[live.PICTURE_TAG]["path"] for h in ours) == media


def train_config(tmp_path: Path, loggers: list[str], pictures: int = 4):
    write_parquet(tmp_path / "val.parquet")
    yaml_live = config_defaults()["live"]
    return OmegaConf.create(
        {
            "trainer": {
                "project_name": "dig",
                "experiment_name": "tiny_stage1",
                "logger": loggers,
                "validation_data_dir": str(tmp_path / "validation"),
            },
            "data": {"val_files": str(tmp_path / "val.parquet")},
            "reward": {"custom_reward_function": {"reward_kwargs": dict(SPEC.reward_kwargs())}},
            "ray_kwargs": {"ray_init": {"runtime_env": {"env_vars": {"TENSORBOARD_DIR": str(tmp_path / "tb")}}}},
            "live": {**yaml_live, "pictures": pictures},
        }
    )


def test_the_recipe_config_turns_it_on_and_the_knobs_are_documented():
    defaults = config_defaults()
    assert defaults["trainer"]["validation_data_dir"] == "${trainer.default_local_dir}/validation"
    assert defaults["live"] == {"pictures": 4, "poll_seconds": 10}
    docs = (Path(__file__).resolve().parents[1] / "docs" / "watching.md").read_text()
    assert all(f"`{tag}`" in docs for tag in [live.PICTURE_TAG, *(live.CURVE_PREFIX + n for n in live.CURVES.values())])


def test_from_config_follows_the_loggers_and_shares_the_wandb_run(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    assert live.from_config(train_config(tmp_path, ["console"])) is None
    assert live.from_config(train_config(tmp_path, ["console", "tensorboard"], pictures=0)) is None

    config = train_config(tmp_path, ["console", "tensorboard", "wandb"])
    w = live.from_config(config)
    tb, wb = w.sinks
    assert isinstance(tb, live.TensorBoardSink) and tb.logdir == tmp_path / "tb"  # verl's folder: one run
    env = config.ray_kwargs.ray_init.runtime_env.env_vars
    assert wb.run_id == env.WANDB_RUN_ID and len(wb.run_id) >= 8 and env.WANDB_MODE == "shared"
    assert (wb.project, wb.name) == ("dig", "tiny_stage1")  # what verl's wandb.init gets
    assert w.pictures == 4 and w.poll_seconds == 10 and w.dump_dir == tmp_path / "validation"
    tb.close()

    monkeypatch.setenv("WANDB_RUN_ID", "mine123")
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = train_config(tmp_path, ["console", "wandb"])
    (wb,) = live.from_config(config).sinks
    env = config.ray_kwargs.ray_init.runtime_env.env_vars
    assert wb.run_id == env.WANDB_RUN_ID == "mine123" and "WANDB_MODE" not in env


def test_watching_runs_the_block_and_takes_the_last_dump_after_it(tmp_path):
    config = train_config(tmp_path, ["console", "tensorboard"])
    with live.watching(config) as w:
        write_dump(tmp_path / "validation", 0)
        write_dump(tmp_path / "validation", 5)  # the last validation, just before training returns
        assert w._thread.is_alive()
    assert [step for step, _ in images(tmp_path / "tb")] == [0, 5]
    assert not w._thread.is_alive()


def test_backfill_cli(tmp_path, capsys):
    write_dump(tmp_path / "validation", 0)
    write_dump(tmp_path / "validation", 5)
    data = write_parquet(tmp_path / "val.parquet")
    argv = ["--dump-dir", str(tmp_path / "validation"), "--data", str(data), "--model", SPEC.model_name]
    argv += ["--logdir", str(tmp_path / "tb")]
    assert live.main(argv) == 0
    assert live.main(argv) == 0  # a rerun into the same folder adds nothing
    assert [step for step, _ in images(tmp_path / "tb")] == [0, 5]
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("recipes.dig.live")]
    assert out == [
        f"recipes.dig.live: 2 validation steps -> {tmp_path / 'tb'}",
        f"recipes.dig.live: 0 validation steps -> {tmp_path / 'tb'}",
    ]
    assert live.main([*argv[:2], "--data", str(tmp_path / "nope.parquet"), *argv[4:]]) == 2
    assert "nope.parquet" in capsys.readouterr().err
