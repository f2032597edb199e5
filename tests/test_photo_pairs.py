"""data_prep.photo on a COCO-format set drawn by the test (data_prep.photo.synthetic): nothing is downloaded.

Covers every edit type and its box rule against re-rendered visible masks, occlusion between pastes, the gates
(each rejection reason provoked on purpose), pixel fidelity (no change outside the boxes), determinism, shards,
SIGKILL + resume, bad input with clear errors, conversion through to_verl + verl's RLHFDataset, and the reward.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_prep import runner as R
from data_prep import to_verl
from data_prep.photo import pairs as P
from data_prep.photo.coco import PhotoDataError, load_coco
from data_prep.photo.compose import Compositor, mask_box
from data_prep.photo.synthetic import write_coco_set

REPO = Path(__file__).resolve().parents[1]
W, H = 128, 96


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("coco")
    write_coco_set(out, num_images=12, seed=5)
    return out


def config(coco_dir: Path, out: Path, **kw) -> P.PhotoConfig:
    base = dict(
        out=out,
        num=4,
        coco=coco_dir / "annotations.json",
        images=coco_dir / "images",
        k="1",
        seed=1,
        width=W,
        height=H,
        progress=False,
    )
    return P.PhotoConfig(**{**base, **kw})


def manifest(out: Path) -> list[dict]:
    """Complete manifest lines (a killed run may leave a torn one, which readers skip)."""
    lines = []
    for line in (out / "manifest.jsonl").read_text().splitlines():
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return lines


def records(out: Path) -> dict[str, dict]:
    return {m["pair_id"]: json.loads((out / m["json"]).read_text()) for m in manifest(out)}


def pixels(out: Path, rec: dict) -> tuple[np.ndarray, np.ndarray]:
    folder = next(out.glob(f"shard-*/{rec['pair_id']}.json")).parent
    return tuple(np.asarray(Image.open(folder / rec["images"][s]).convert("RGB")).astype(int) for s in ("a", "b"))


@pytest.fixture(scope="module")
def per_type(coco_dir, tmp_path_factory) -> dict[str, Path]:
    """One run of 3 single-difference pairs per edit type, plus a K = 1..4 run with no-difference pairs."""
    root = tmp_path_factory.mktemp("runs")
    runs = {}
    for t in P.EDIT_TYPES:
        P.generate(config(coco_dir, root / t, num=3, seed=10, change_weights={t: 1.0}))
        runs[t] = root / t
    P.generate(config(coco_dir, root / "mixed", num=10, k="1-4", seed=12, no_diff_fraction=0.2))
    runs["mixed"] = root / "mixed"
    return runs


# ----------------------------------------------------------------------------------- contract and box rules


def test_every_edit_type_boxes_the_visible_mask_by_the_renderers_rule(per_type, coco_dir):
    settings = P.load_settings()
    coco = load_coco(coco_dir / "annotations.json", coco_dir / "images", settings)
    comp = Compositor(coco, W, H, settings["pastes"]["feather_sigma_px"])
    for t in P.EDIT_TYPES:
        recs = records(per_type[t])
        assert len(recs) == 3
        for rec in recs.values():
            assert rec["source"] == "photo" and rec["num_differences"] == 1
            assert rec["source_image"]["id"] == rec["scene"]["background"]["image_id"]
            assert rec["source_image"]["file_name"] == coco.images[rec["source_image"]["id"]].file_name
            (d,) = rec["differences"]
            assert d["type"] == t and d["ann_id"] in rec["instance_ids"]
            # the boxes again, from masks re-rendered out of the recorded scenes
            img_a, _, vis_a = comp.render(rec["scene"])
            img_b, _, vis_b = comp.render(rec["scene_b"])
            assert np.array_equal(img_a, pixels(per_type[t], rec)[0]) and np.array_equal(
                img_b, pixels(per_type[t], rec)[1]
            )
            oid = d["object_id"]
            if t in ("addition", "color"):
                union = vis_b[oid]
            elif t == "removal":
                union = vis_a[oid]
            else:  # size and replacement: union of A and B
                union = vis_a[oid] | vis_b[oid]
            assert d["box"] == mask_box(union)
            ids_a = {p["id"] for p in rec["scene"]["pastes"]} | {r["id"] for r in rec["scene"]["recolor"]}
            ids_b = {p["id"] for p in rec["scene_b"]["pastes"]} | {r["id"] for r in rec["scene_b"]["recolor"]}
            assert (oid in ids_a, oid in ids_b) == {"addition": (False, True), "removal": (True, False)}.get(
                t, (True, True)
            )
            if t == "replacement":
                assert d["category_b"] != d["category"] and d["ann_id_b"] in rec["instance_ids"]
            if t == "size":
                (pa,) = [p for p in rec["scene"]["pastes"] if p["id"] == oid]
                (pb,) = [p for p in rec["scene_b"]["pastes"] if p["id"] == oid]
                factor = pb["scale"] / pa["scale"]
                assert factor < 0.76 or factor > 1.34
            if t == "color":
                hue = [
                    x.get("hue_deg", 0) for x in rec["scene_b"]["pastes"] + rec["scene_b"]["recolor"] if x["id"] == oid
                ]
                assert 70 <= hue[0] <= 290


def test_pixels_change_inside_every_box_and_nowhere_else(per_type):
    """Independent of the gate code: every box holds >= 20 px changed by > 12/255 (at 480x320; the renderer's
    rule scaled to this size), and nothing changes by > 12/255 beyond the feather (4 px) around the boxes."""
    seen = set()
    for run in per_type.values():
        for rec in records(run).values():
            a, b = pixels(run, rec)
            changed = np.abs(a - b).max(axis=2) > 12
            inside = np.zeros_like(changed)
            for d in rec["differences"]:
                x0, y0, x1, y1 = d["box"]
                assert changed[y0:y1, x0:x1].sum() >= 3, (rec["pair_id"], d)
                inside[max(0, y0 - 4) : y1 + 4, max(0, x0 - 4) : x1 + 4] = True
                seen.add(d["type"])
            assert not (changed & ~inside).any(), rec["pair_id"]
            if not rec["differences"]:
                assert np.array_equal(a, b)
    assert seen == set(P.EDIT_TYPES)


def test_colour_edit_keeps_brightness_and_changes_hue(per_type):
    for rec in records(per_type["color"]).values():
        a, b = pixels(per_type["color"], rec)
        x0, y0, x1, y1 = rec["differences"][0]["box"]
        luma = np.array([0.299, 0.587, 0.114])
        pa, pb = a[y0:y1, x0:x1].reshape(-1, 3), b[y0:y1, x0:x1].reshape(-1, 3)
        moved = np.abs(pa - pb).max(axis=1) > 12
        assert moved.sum() > 0
        assert abs(float((pa[moved] @ luma).mean() - (pb[moved] @ luma).mean())) < 12  # hue, not brightness


def test_mixed_run_stats_manifest_and_no_difference_pairs(per_type):
    run = per_type["mixed"]
    recs = records(run)
    assert sorted(recs) == [f"p12-{i:07d}" for i in range(10)]
    ks = [r["num_differences"] for r in recs.values()]
    assert 0 in ks and max(ks) >= 2 and all(0 <= k <= 4 for k in ks)
    stats = json.loads((run / "stats.json").read_text())
    assert stats["accepted"] == 10 and stats["candidates"] == 10 + stats["rejected_total"]
    assert sum(stats["differences_by_type"].values()) == sum(ks)
    for m in manifest(run):
        assert m["types"] == [d["type"] for d in recs[m["pair_id"]]["differences"]]
        assert (run / m["image_a"]).is_file() and (run / m["image_b"]).is_file()
    assert json.loads((run / "config.json").read_text())["source"] == "photo"
    # random stacking: some pastes are partly hidden by later ones (the boxes then follow the visible part)
    assert any(o["visible_px"] < o["mask_px"] for r in recs.values() for o in r["objects_a"] if o["pasted"])


# ------------------------------------------------------------------------------------ occlusion and gates


@pytest.fixture(scope="module")
def comp(coco_dir):
    settings = P.load_settings()
    coco = load_coco(coco_dir / "annotations.json", coco_dir / "images", settings)
    return Compositor(coco, W, H, settings["pastes"]["feather_sigma_px"]), coco, settings


def _paste(coco, oid, x, y, long_side, i=0, **kw):
    inst = coco.instances[i]
    return {
        "id": oid,
        "ann_id": inst.ann_id,
        "x": x,
        "y": y,
        "scale": long_side / max(inst.bbox[2:]),
        "gain": 1.0,
        "hue_deg": 0.0,
        **kw,
    }


def _scene(coco, pastes, recolor=()):
    bg_id = coco.backgrounds[-1]
    info = coco.images[bg_id]
    return {
        "background": {"image_id": bg_id, "x0": 0.0, "y0": 0.0, "scale": max(W / info.width, H / info.height)},
        "recolor": list(recolor),
        "pastes": pastes,
    }


def _check(comp, scene_a, scene_b, edits, settings):
    img_a, full_a, vis_a = comp.render(scene_a)
    img_b, full_b, vis_b = comp.render(scene_b)
    gates = P.gate_thresholds(settings, W, H)
    return P.check_pair(img_a, img_b, vis_a, vis_b, full_a, full_b, edits, gates), (full_a, vis_a, full_b, vis_b)


def test_later_pastes_occlude_earlier_ones_and_boxes_use_the_visible_part(comp):
    comp, coco, settings = comp
    low, high = _paste(coco, 1, 20, 20, 40, i=0), _paste(coco, 2, 40, 30, 40, i=1)
    scene_a = _scene(coco, [low, high])
    scene_b = _scene(coco, [high])  # the lower paste removed; the upper one stays on top
    (reason, diffs), (full_a, vis_a, _, _) = _check(
        comp, scene_a, scene_b, [{"type": "removal", "object_id": 1}], settings
    )
    assert reason is None
    assert np.array_equal(vis_a[1], full_a[1] & ~full_a[2]) and (full_a[1] & full_a[2]).any()  # really occluded
    assert diffs[0]["box"] == mask_box(full_a[1] & ~full_a[2])
    assert diffs[0]["visible_px_a"] == int(vis_a[1].sum()) < int(full_a[1].sum())
    # the same paste on top instead: the full mask is visible and boxed
    (reason, diffs), (full_a, vis_a, _, _) = _check(
        comp, _scene(coco, [high, low]), _scene(coco, [high]), [{"type": "removal", "object_id": 1}], settings
    )
    assert reason is None and diffs[0]["box"] == mask_box(full_a[1])


def test_gates_reject_hidden_unchanged_and_unlabelled_changes(comp):
    comp, coco, settings = comp
    base = _paste(coco, 1, 30, 20, 40, i=0)
    cover = _paste(coco, 2, 20, 10, 70, i=2)
    # an addition almost entirely under a later paste
    hidden = _paste(coco, 3, 35, 25, 30, i=1)
    (reason, _), _ = _check(
        comp,
        _scene(coco, [base, cover]),
        _scene(coco, [base, hidden, cover]),
        [{"type": "addition", "object_id": 3}],
        settings,
    )
    assert reason in ("difference_occluded", "difference_too_small")
    # a colour edit that does not change the colour (hue rotated by 0)
    (reason, _), _ = _check(
        comp,
        _scene(coco, [base]),
        _scene(coco, [dict(base, hue_deg=0.0)]),
        [{"type": "color", "object_id": 1}],
        settings,
    )
    assert reason == "difference_unchanged"
    # an unlabelled change: a second paste moves between A and B but only the first is claimed
    other = _paste(coco, 2, 80, 50, 30, i=1)
    (reason, _), _ = _check(
        comp,
        _scene(coco, [base, other]),
        _scene(coco, [dict(base, hue_deg=180.0), dict(other, x=60)]),
        [{"type": "color", "object_id": 1}],
        settings,
    )
    assert reason == "change_outside_boxes"


def test_rejections_are_counted_by_reason(per_type):
    stats = [json.loads((run / "stats.json").read_text()) for run in per_type.values()]
    reasons = {r for s in stats for r in s["rejected"]}
    assert reasons <= {
        "difference_too_small",
        "difference_occluded",
        "difference_unchanged",
        "change_outside_boxes",
        "no_replacement",
        "no_saturated_instance",
        "sampling_failed",
    }
    assert sum(s["candidates"] for s in stats) == sum(s["accepted"] + s["rejected_total"] for s in stats)


def test_crowd_tiny_and_truncated_instances_are_never_used(coco_dir, per_type):
    raw = json.loads((coco_dir / "annotations.json").read_text())
    coco = load_coco(coco_dir / "annotations.json", coco_dir / "images", P.load_settings())
    assert coco.skipped["crowd"] == 12 and coco.skipped["truncated"] >= 12 and coco.skipped["tiny"] >= 1
    banned = set()
    for ann in raw["annotations"]:
        x, y, w, h = ann["bbox"]
        if ann["iscrowd"] or ann["area"] < 1024 or x <= 2:
            banned.add(ann["id"])
    used = {i for run in per_type.values() for rec in records(run).values() for i in rec["instance_ids"]}
    assert used and not used & banned
    encodings = {
        type(a["segmentation"]).__name__
        + str(type(a["segmentation"]).__name__ == "dict" and type(a["segmentation"]["counts"]).__name__)
        for a in raw["annotations"]
        if a["id"] in used
    }
    assert encodings == {"listFalse", "dictstr", "dictlist"}  # polygons, compressed and uncompressed RLE all decoded


# ------------------------------------------------------------------------------ determinism, shards, resume


def test_same_seed_same_pairs_and_shards_make_the_same_run(coco_dir, per_type, tmp_path):
    out = tmp_path / "sharded"
    for i in range(2):
        P.generate(config(coco_dir, out, num=10, k="1-4", seed=12, no_diff_fraction=0.2, shard=(i, 2)))
    mine, ref = records(out), records(per_type["mixed"])
    assert sorted(mine) == sorted(ref)
    for pid, rec in mine.items():
        assert rec["differences"] == ref[pid]["differences"] and rec["scene_b"] == ref[pid]["scene_b"]
        assert all(
            np.array_equal(x, y) for x, y in zip(pixels(out, rec), pixels(per_type["mixed"], ref[pid]), strict=True)
        )
    assert len(json.loads((out / "stats.json").read_text())["shards"]) == 2


def photo_cmd(coco_dir: Path, out: Path, num: int = 40) -> list[str]:
    cmd = [sys.executable, "-m", "data_prep.photo", "--coco", str(coco_dir / "annotations.json")]
    cmd += ["--images", str(coco_dir / "images"), "--num", str(num), "--k", "1-4", "--seed", "12"]
    cmd += ["--no-diff-fraction", "0.2", "--width", str(W), "--height", str(H), "--workers", "2"]
    return cmd + ["--out-dir", str(out), "--no-progress"]


def run_until(cmd: list[str], crash_at: str) -> subprocess.CompletedProcess:
    """Run the generator with ``DIG_CRASH_AT`` (dig_common.crashpoints): it kills or interrupts itself at that
    point, not after a guessed time; then its pool workers are ended too."""
    proc = subprocess.Popen(
        cmd, cwd=REPO, env={**os.environ, "DIG_CRASH_AT": crash_at}, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    proc.wait(timeout=120)
    with contextlib.suppress(ProcessLookupError):  # orphaned pool workers hold the pipes open
        os.killpg(proc.pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def check_consistent(out: Path, num: int) -> dict:
    """Every pair exactly once, its files whole, and stats.json counting exactly the manifest's pairs."""
    ids = [m["pair_id"] for m in manifest(out)]
    assert sorted(ids) == [f"p12-{i:07d}" for i in range(num)]  # each exactly once
    assert not list(out.glob("shard-*/*.tmp-*"))
    stats = json.loads((out / "stats.json").read_text())
    assert stats["accepted"] == num
    types = collections.Counter(t for m in manifest(out) for t in m["types"])
    assert stats["differences_by_type"] == dict(types)
    return stats


@pytest.mark.parametrize(
    ("point", "recounted"),
    [
        ("pair-listed:4", 1),  # killed between the manifest line and stats.json: the resume counts that pair
        ("pair-committed:4", 0),  # killed after both
    ],
)
def test_sigkill_at_a_chosen_point_then_resume_makes_every_pair_once(coco_dir, per_type, tmp_path, point, recounted):
    out = tmp_path / "killed"
    cmd = photo_cmd(coco_dir, out)
    killed = run_until(cmd, point)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert len(manifest(out)) == 4
    counted = json.loads((out / "shard-000-of-001" / "stats.json").read_text())["accepted"]
    assert counted == 4 - recounted  # what the kill left: stats lag the manifest by the pair at the kill
    # what a kill can also leave behind: a torn manifest line and a temp file
    with (out / "manifest.jsonl").open("a") as f:
        f.write('{"pair_id": "p12-00')
    (out / "shard-000-of-001" / "p12-0000039_a.png.tmp-1-2").write_bytes(b"partial")
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["this_run"]["pairs"] == 36
    stats = check_consistent(out, 40)
    assert stats.get("recounted", 0) == recounted
    ref = records(per_type["mixed"])  # the first 10 pairs also exist in the uninterrupted run
    for pid, rec in records(out).items():
        a, b = pixels(out, rec)  # every file decodes
        if pid in ref:  # 2 worker processes and a resume make the same pairs as one uninterrupted process
            assert rec["differences"] == ref[pid]["differences"]
            assert all(np.array_equal(x, y) for x, y in zip((a, b), pixels(per_type["mixed"], ref[pid]), strict=True))
        assert a.shape == b.shape == (H, W, 3)


def test_ctrl_c_keeps_every_finished_pair_and_says_how_to_resume(coco_dir, tmp_path):
    out = tmp_path / "interrupted"
    cmd = photo_cmd(coco_dir, out)
    stopped = run_until(cmd, "pair-committed:3:INT")  # Ctrl-C right after the third pair is committed
    assert stopped.returncode == 130
    assert "Traceback" not in stopped.stderr
    assert stopped.stderr.strip().splitlines()[-1] == f"{P.PROG}: interrupted: {R.RESUME_HINT}"
    listed = manifest(out)
    assert len(listed) >= 3  # the three, and any pair that finished while stopping
    assert all((out / m["image_b"]).is_file() for m in listed)
    assert json.loads((out / "stats.json").read_text())["accepted"] == len(listed)  # counted as listed
    rerun = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    assert json.loads(rerun.stdout)["this_run"]["pairs"] == 40 - len(listed)  # nothing made twice
    check_consistent(out, 40)


@pytest.mark.parametrize("lost", ["image_b", "json"])
def test_resume_remakes_a_listed_pair_that_lost_a_file(coco_dir, per_type, tmp_path, lost):
    out = tmp_path / "lost"
    shutil.copytree(per_type["mixed"], out)
    victim = manifest(out)[2]
    (out / victim[lost]).unlink()
    stats = P.generate(config(coco_dir, out, num=10, k="1-4", seed=12, no_diff_fraction=0.2))
    assert stats["this_run"]["pairs"] == 1 and stats["accepted"] == 10  # made again, not counted twice
    rec = records(out)[victim["pair_id"]]
    ref = records(per_type["mixed"])[victim["pair_id"]]
    assert all(np.array_equal(x, y) for x, y in zip(pixels(out, rec), pixels(per_type["mixed"], ref), strict=True))
    assert len(to_verl.read_manifest(out)) == 10


def test_resume_with_other_settings_is_refused(coco_dir, per_type):
    with pytest.raises(ValueError, match=r"different settings \(seed: 12 -> 13"):
        P.generate(config(coco_dir, per_type["mixed"], num=10, k="1-4", seed=13, no_diff_fraction=0.2))


# ----------------------------------------------------------------------------------------------- bad input


def run_cli(capsys, *args) -> str:
    """The one error line of a run that must be refused (exit 2)."""
    assert P.main(list(map(str, args)) + ["--no-progress"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"{P.PROG}: error: ")
    return line


def test_bad_input_fails_with_a_clear_error_before_writing(coco_dir, tmp_path, capsys):
    ann, images = coco_dir / "annotations.json", coco_dir / "images"
    raw = json.loads(ann.read_text())
    out = tmp_path / "out"

    def with_raw(mutate, name):
        doc = json.loads(json.dumps(raw))
        mutate(doc)
        path = tmp_path / name
        path.write_text(json.dumps(doc))
        return path

    # a missing image file
    missing = with_raw(lambda d: d["images"].append({**d["images"][0], "id": 999, "file_name": "gone.jpg"}), "m.json")
    err = run_cli(capsys, "--coco", missing, "--images", images, "--num", 1, "--out-dir", out)
    assert "1 of 13 images listed" in err and "gone.jpg" in err
    # corrupt annotation files
    (tmp_path / "torn.json").write_text(ann.read_text()[:500])
    assert "not valid JSON" in run_cli(
        capsys, "--coco", tmp_path / "torn.json", "--images", images, "--num", 1, "--out-dir", out
    )
    no_seg = with_raw(lambda d: d["annotations"][3].pop("segmentation"), "s.json")
    assert "annotations[3] (id 4): missing 'segmentation'" in run_cli(
        capsys, "--coco", no_seg, "--images", images, "--num", 1, "--out-dir", out
    )
    rle = next(i for i, a in enumerate(raw["annotations"]) if isinstance(a["segmentation"], dict))
    bad_rle = with_raw(lambda d: d["annotations"][rle]["segmentation"].update(size=[10, 10]), "r.json")
    assert f"annotations[{rle}]" in (
        e := run_cli(capsys, "--coco", bad_rle, "--images", images, "--num", 1, "--out-dir", out)
    )
    assert "does not match image" in e
    odd = with_raw(
        lambda d: d["annotations"].__setitem__(0, {**d["annotations"][0], "segmentation": [[1, 2, 3]]}), "o.json"
    )
    assert "not a polygon" in run_cli(capsys, "--coco", odd, "--images", images, "--num", 1, "--out-dir", out)
    # category filters that leave nothing
    err = run_cli(capsys, "--coco", ann, "--images", images, "--num", 1, "--out-dir", out, "--categories", "unicorn")
    assert "--categories: unicorn not in" in err and "disc" in err
    only_crowd = with_raw(
        lambda d: (
            d["categories"].append({"id": 77, "name": "crowdonly"})
            or d["annotations"].append(
                {**next(a for a in d["annotations"] if a["iscrowd"]), "id": 10**6, "category_id": 77}
            )
        ),
        "c.json",
    )
    err = run_cli(
        capsys, "--coco", only_crowd, "--images", images, "--num", 1, "--out-dir", out, "--categories", "crowdonly"
    )
    assert "with --categories crowdonly: no usable instance" in err and "1 crowd" in err
    assert not out.exists()


def test_an_unreadable_image_names_the_file(coco_dir, tmp_path):
    broken = tmp_path / "coco"
    write_coco_set(broken, num_images=2, seed=9)
    (broken / "images" / "000001.jpg").write_bytes(b"not a jpeg")
    (broken / "images" / "000002.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(PhotoDataError, match=r"00000[12]\.jpg\): cannot be read"):
        P.generate(config(broken, tmp_path / "out", num=1))


def test_lvis_style_images_named_by_url_load(coco_dir, tmp_path):
    raw = json.loads((coco_dir / "annotations.json").read_text())
    for im in raw["images"]:
        im["coco_url"] = "http://images.cocodataset.org/train2017/" + im.pop("file_name")
    path = tmp_path / "lvis.json"
    path.write_text(json.dumps(raw))
    coco = load_coco(path, coco_dir / "images", P.load_settings())
    assert coco.images[1].file_name == "000001.jpg" and coco.image(1).shape == (150, 200, 3)


def test_category_filter_keeps_only_those_categories(coco_dir, tmp_path):
    out = tmp_path / "discs"
    P.generate(config(coco_dir, out, num=3, categories=["disc", "star"], change_weights={"addition": 1.0}))
    cats = {d["category"] for rec in records(out).values() for d in rec["differences"]}
    assert cats and cats <= {"disc", "star"}


# -------------------------------------------------------------------------- to_verl, verl and the reward


@pytest.mark.verl
def test_converts_loads_in_verl_and_the_ground_truth_scores_one(per_type, tmp_path):
    from test_to_verl import load_with_verl
    from tiny_qwen import build_tiny_processor

    from data_prep.budget import max_prompt_length_of
    from dig_common.models import load_model_spec
    from reward_fns.dig_reward import compute_score
    from reward_fns.geometry import from_pixels

    model = "qwen2_5_vl_7b"
    spec = load_model_spec(model)
    out = tmp_path / "photo.parquet"
    result = to_verl.convert(per_type["mixed"], out, model, stage=3, split="train", allowed_k={0, 1, 2, 3, 4})
    assert result["num_rows"] == 10
    dataset = load_with_verl(
        out,
        build_tiny_processor(spec.family, spec.prompt_variant),
        spec.patch_size,
        max_prompt_length_of(model),
        tmp_path / "cache",
    )
    assert len(dataset) == 10
    recs = records(per_type["mixed"])
    for item in range(len(dataset)):
        row = dataset[item]
        rec = recs[row["extra_info"]["pair_id"]]
        a, b = pixels(per_type["mixed"], rec)
        parts = row["raw_prompt"][-1]["content"]
        assert np.array_equal(np.asarray(parts[0]["image"].convert("RGB")), a)
        assert np.array_equal(np.asarray(parts[1]["image"].convert("RGB")), b)
        truth = row["reward_model"]["ground_truth"]
        gt = json.loads(truth)
        assert gt["boxes"] == [d["box"] for d in rec["differences"]] and (gt["width"], gt["height"]) == (W, H)
        frame = dict(factor=spec.resize_factor, min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
        answer = json.dumps(from_pixels(gt["boxes"], spec.coord_mode, W, H, **frame).tolist() if gt["boxes"] else [])
        kwargs = {
            "coord_mode": spec.coord_mode,
            "min_pixels": spec.min_pixels,
            "max_pixels": spec.max_pixels,
            "resize_factor": spec.resize_factor,
        }
        assert compute_score("dig", answer, truth, row["extra_info"], **kwargs)["score"] == pytest.approx(1.0)
        if gt["boxes"]:
            wrong = json.dumps([[0, 0, 1, 1]])
            assert compute_score("dig", wrong, truth, row["extra_info"], **kwargs)["score"] < 0.5


def test_ray_workers_index_cache_gives_the_same_pairs(coco_dir, per_type, tmp_path):
    """The Ray driver pickles its checked set into --out-dir; a worker loads it instead of parsing the JSON again."""
    import shutil

    copy = tmp_path / "coco"
    shutil.copytree(coco_dir, copy)
    out = tmp_path / "cached"
    cfg = config(copy, out, num=10, k="1-4", seed=12, no_diff_fraction=0.2)
    cache = P.write_index_cache(cfg)
    P._PROCESS.clear()
    (copy / "annotations.json").rename(copy / "moved.json")  # a worker that parsed the JSON would fail now
    try:
        results = P._ray_chunk(cfg, [0, 3, 7])  # what a Ray task runs, here in-process
    finally:
        P._PROCESS.clear()
    assert cache.name == P.INDEX_CACHE and [r["index"] for r, _ in results] == [0, 3, 7]
    ref = records(per_type["mixed"])
    for manifest_line, _ in results:
        rec = json.loads((out / manifest_line["json"]).read_text())
        assert rec["differences"] == ref[rec["pair_id"]]["differences"]
        assert all(
            np.array_equal(x, y)
            for x, y in zip(pixels(out, rec), pixels(per_type["mixed"], ref[rec["pair_id"]]), strict=True)
        )


@pytest.mark.skipif(not os.environ.get("DIG_TEST_RAY"), reason="set DIG_TEST_RAY=1 to run the local Ray test")
def test_ray_local_matches_the_pool(coco_dir, per_type, tmp_path, monkeypatch, request):
    import shutil
    import tempfile

    ray_tmp = tempfile.mkdtemp(prefix="dig-ray-", dir="/tmp")  # short: Ray's socket paths must stay < 108 bytes
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    request.addfinalizer(lambda: shutil.rmtree(ray_tmp, ignore_errors=True))
    out = tmp_path / "ray-run"
    P.generate(config(coco_dir, out, num=10, k="1-4", seed=12, no_diff_fraction=0.2, ray_address="local", workers=2))
    mine, ref = records(out), records(per_type["mixed"])
    assert sorted(mine) == sorted(ref)
    assert all(mine[p]["differences"] == ref[p]["differences"] for p in mine)


# ---------------------------------------------------------------------------- stages: per-stage source mix


def test_default_curriculum_is_rendered_only():
    from data_prep.stages import load_source_mixes

    mixes = load_source_mixes()
    assert set(mixes) == {"1", "2", "3", "test"}
    assert all(m.fractions == {"rendered": 1.0} and not m.uses_photo for m in mixes.values())


@pytest.mark.parametrize(
    ("sources", "message"),
    [
        ({"rendered": 0.7, "photo": 0.2}, r"stages\.1\.sources: shares sum to 0\.9, not 1"),
        ({"rendered": 0.5, "diffusion": 0.5}, r"unknown source\(s\) \['diffusion'\]"),
        ({"rendered": 1.5, "photo": -0.5}, r"sources\.rendered: expected a share in \[0, 1\]"),
        ("half", r"expected a mapping like"),
    ],
)
def test_bad_source_mix_is_refused_when_read(tmp_path, sources, message):
    import yaml

    from data_prep.stages import STAGES_FILE, load_source_mixes

    raw = yaml.safe_load(STAGES_FILE.read_text())
    raw["stages"]["1"]["sources"] = sources
    path = tmp_path / "stages.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=message):
        load_source_mixes(path)


def test_build_mixes_rendered_and_photo_pairs_into_one_parquet(coco_dir, tmp_path, capsys):
    """Stage 1 at 50 % rendered (the Blender-free stand-in, data_prep.synthetic) and 50 % photo, COCO paths from
    the command line; the build reports the mix, the parquet holds both sources, a rerun skips everything."""
    import pyarrow.parquet as pq
    import yaml

    from data_prep import build as B
    from data_prep import synthetic
    from data_prep.stages import STAGES_FILE

    raw = yaml.safe_load(STAGES_FILE.read_text())
    raw["stages"]["1"]["sources"] = {"rendered": 0.5, "photo": 0.5}
    stages = tmp_path / "stages.yaml"
    stages.write_text(yaml.safe_dump(raw))
    argv = ["--out-dir", str(tmp_path / "data"), "--model", "qwen2_5_vl_7b", "--stage", "1"]
    argv += ["--stages-file", str(stages), "--num-train", "4", "--num-val", "2"]
    argv += ["--width", "64", "--height", "48", "--no-progress"]
    # without the COCO set: a clear error before anything is generated
    assert B.main(argv) == 2
    assert (
        "stage 1 mixes 50 % rendered, 50 % photo pairs: give the COCO-format set with --coco" in capsys.readouterr().err
    )
    assert not (tmp_path / "data").exists()

    from data_prep.stages import load_curriculum, load_source_mixes

    curriculum = load_curriculum(stages).with_sizes(4, 2, 2)
    options = B.BuildOptions(
        width=64, height=48, progress=False, coco=coco_dir / "annotations.json", images=coco_dir / "images"
    )
    events = []

    def run():
        events.clear()
        B.build(
            tmp_path / "data",
            "qwen2_5_vl_7b",
            ["1"],
            curriculum,
            options,
            generate_fn=synthetic.generate,
            log=events.append,
            mixes=load_source_mixes(stages),
        )
        return events

    run()
    assert events[0] == {
        "event": "mix",
        "stage": "1",
        "sources": "50 % rendered, 50 % photo",
        "pairs": {"train": {"rendered": 2, "photo": 2}, "val": {"rendered": 1, "photo": 1}},
    }
    generated = {(e["source"], Path(e["dir"]).name) for e in events if e["event"] == "generate"}
    assert generated == {("rendered", "train"), ("photo", "train-photo"), ("rendered", "val"), ("photo", "val-photo")}
    converted = [e for e in events if e["event"] == "convert"]
    assert [e["sources"] for e in converted] == [{"rendered": 2, "photo": 2}, {"rendered": 1, "photo": 1}]
    table = pq.read_table(tmp_path / "data" / "qwen2_5_vl_7b" / "stage1" / "train.parquet", columns=["extra_info"])
    table = table.to_pylist()
    ids = [r["extra_info"]["pair_id"] for r in table]
    assert len(ids) == 4 and sum(i.startswith("p") for i in ids) == 2 and sum(i.startswith("s") for i in ids) == 2
    assert [e["event"] for e in run()] == ["mix", "skip", "skip"]  # rerun: nothing generated or rewritten


# ------------------------------------------------------------------------- instances cut by the frame, each edge

FRAME_W, FRAME_H, SIDE = 200, 150, 40  # one photo; square instances of SIDE px (area 1600 >= min_area_px)
BORDER = 2  # photo.yaml instances.border_px
# (x, y) of an instance's box: touching each of the four edges (within the border), then one pixel further in
EDGE_CASES = {
    "left": ((BORDER, 50), (BORDER + 1, 50)),
    "top": ((80, BORDER), (80, BORDER + 1)),
    "right": ((FRAME_W - BORDER - SIDE, 50), (FRAME_W - BORDER - SIDE - 1, 50)),
    "bottom": ((80, FRAME_H - BORDER - SIDE), (80, FRAME_H - BORDER - SIDE - 1)),
}


def one_instance_coco(folder: Path, x: int, y: int) -> Path:
    """A COCO set of one photo with a square instance at (x, y), the case (only its position varies), and one in
    the middle that is always usable (a set with no usable instance is refused as a whole)."""
    (folder / "images").mkdir(parents=True)
    Image.new("RGB", (FRAME_W, FRAME_H), (120, 90, 60)).save(folder / "images" / "p.jpg")

    def square(ann_id: int, x: int, y: int) -> dict:
        polygon = [x, y, x + SIDE, y, x + SIDE, y + SIDE, x, y + SIDE]
        box = {"bbox": [x, y, SIDE, SIDE], "area": SIDE * SIDE, "iscrowd": 0, "segmentation": [polygon]}
        return {"id": ann_id, "image_id": 1, "category_id": 1, **box}

    raw = {
        "images": [{"id": 1, "file_name": "p.jpg", "width": FRAME_W, "height": FRAME_H}],
        "annotations": [square(1, x, y), square(2, 80, 55)],
        "categories": [{"id": 1, "name": "box"}],
    }
    path = folder / "annotations.json"
    path.write_text(json.dumps(raw))
    return path


@pytest.mark.parametrize("edge", sorted(EDGE_CASES))
def test_an_instance_cut_by_any_edge_is_never_used(tmp_path, edge):
    assert P.load_settings()["instances"]["border_px"] == BORDER
    cut, inside = EDGE_CASES[edge]
    for (x, y), truncated in ((cut, 1), (inside, 0)):
        folder = tmp_path / f"{x}-{y}"
        coco = load_coco(one_instance_coco(folder, x, y), folder / "images", P.load_settings())
        assert coco.skipped["truncated"] == truncated, (edge, x, y)
        assert sorted(i.ann_id for i in coco.instances) == ([2] if truncated else [1, 2]), (edge, x, y)
