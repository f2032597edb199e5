"""The unlabeled-change rule, its generator gate (real renders) and ``python -m data_prep.audit`` on a real run."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from data_prep.audit import AuditRule, audit, findings
from data_prep.manifest import read_manifest
from data_prep.render import scene as S
from data_prep.render.generate import GenerateConfig, RenderWorker, generate
from data_prep.render.ground_truth import unlabeled_blobs

SMALL = {"width": 64, "height": 64, "samples": 1, "denoise": False, "progress": False, "threads": 1}


def _pair(h=40, w=60):
    a = np.full((h, w, 3), 100, np.uint8)
    return a, a.copy()


def test_blob_rule_threshold_connectivity_size_and_dilation():
    a, b = _pair()
    b[5:8, 5:8, 1] = 125  # 9 px changed by 25 > 24
    assert unlabeled_blobs(a, b, [], 24, 9, 8) == [{"box": [5, 5, 8, 8], "px": 9}]
    assert unlabeled_blobs(a, b, [], 24, 10, 8) == []  # smaller than min_px
    b[5:8, 5:8, 1] = 124  # a change of exactly 24 is not "more than 24"
    assert unlabeled_blobs(a, b, [], 24, 1, 8) == []
    a, b = _pair()
    for i in range(6):  # a diagonal line is one 8-connected blob of 6 px
        b[10 + i, 20 + i] = 0
    assert unlabeled_blobs(a, b, [], 24, 6, 8) == [{"box": [20, 10, 26, 16], "px": 6}]
    # The blob's last column is 25: a box from column 33 grown by 8 px reaches it; one from column 34 does not.
    assert unlabeled_blobs(a, b, [[33, 10, 40, 16]], 24, 6, 8) == []
    assert unlabeled_blobs(a, b, [[34, 10, 40, 16]], 24, 6, 8) != []


def test_gate_thresholds_scale_with_the_image():
    vocab = S.load_vocabulary()
    assert vocab.gate_thresholds(480, 320)["unlabeled_min_px"] == 154  # 0.1 % of the image
    assert vocab.gate_thresholds(64, 64)["unlabeled_min_px"] == vocab.gates["unlabeled_blob_floor"]
    assert AuditRule().blob_min_px(480, 320) == 154


@pytest.mark.render
def test_gate_rejects_a_change_nobody_boxed(tmp_path):
    vocab = S.load_vocabulary()
    a = S.sample_scene(vocab, 0, num_objects=2)

    def large_rubber(**placed):
        return S.resolve_object(vocab, {"material": "rubber", "size": "large", **placed})

    a["objects"] = [
        large_rubber(id=1, shape="cube", color="red", x=1.5, y=-1.5, rotation_deg=30.0),
        large_rubber(id=2, shape="sphere", color="cyan", x=-1.5, y=1.5, rotation_deg=0.0),
    ]
    b = S.apply_edits(vocab, a, [{"type": "removal", "object_id": 2}])
    config = GenerateConfig(out=tmp_path, num=1, **{k: v for k, v in SMALL.items() if k != "progress"})
    settings = dict(config.render_settings(), seed=0, width=96, height=96)

    def job(name, differences):
        return {
            "scene_a": a,
            "scene_b": b,
            "differences": differences,
            "render": settings,
            "gates": vocab.gate_thresholds(96, 96),
            "out_a": str(tmp_path / f"{name}_a.png"),
            "out_b": str(tmp_path / f"{name}_b.png"),
        }

    with RenderWorker() as worker:
        # The sphere vanishes but the pair claims no difference: no mask gate looks at an object that is gone.
        silent = worker.request(job("silent", []))
        labelled = worker.request(job("labelled", [{"type": "removal", "object_id": 2}]))
    assert not silent["accepted"] and silent["reason"] == "unlabeled_change", silent
    assert labelled["accepted"], labelled


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit") / "run"
    generate(GenerateConfig(out=out, num=4, k="1-2", seed=11, **SMALL))
    return out


def _cli(*args):
    proc = subprocess.run([sys.executable, "-m", "data_prep.audit", *map(str, args)], capture_output=True, text=True)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.mark.render
def test_audit_of_a_generated_run(run, tmp_path):
    rc, stdout, stderr = _cli("--pairs", run, "--out", tmp_path / "audit.json", "--gallery", tmp_path / "g.png")
    report = json.loads(stdout)
    assert rc == (1 if any(findings(report).values()) else 0), stderr  # exit 1: the audit flagged something
    assert report == json.loads((tmp_path / "audit.json").read_text())
    assert report["pairs"] == 4 and report["k_agreement"]["pairs_agree"] == 4
    assert report["boxes"]["total"] == sum(e.num_differences for e in read_manifest(run).entries)
    assert sum(report["types"].values()) == report["boxes"]["total"]
    assert report["images"]["sizes"] == {"64x64": 4}
    assert report["difficulty"]["visible_px"]["n"] == report["boxes"]["total"]
    assert report["difficulty"]["visible_px"]["min"] >= S.load_vocabulary().gate_thresholds(64, 64)["min_visible_px"]
    assert sum(report["difficulty"]["num_objects_a"].values()) == 4
    # The generator's gates hold at their own 64x64 thresholds: every box changed, no unlabeled blob.
    gates = S.load_vocabulary().gate_thresholds(64, 64)
    gate_rule = AuditRule(box_min_px=gates["min_changed_px"], blob_fraction=gates["unlabeled_min_px"] / 64**2)
    gated = audit(run, gate_rule)
    assert gated["boxes"]["fraction_visibly_changed"] == 1.0
    assert gated["unlabeled_change"]["pairs_flagged"] == 0
    assert Image.open(tmp_path / "g.png").width > 0


@pytest.mark.render
def test_audit_finds_tampered_pairs_and_draws_them(run, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    recs = sorted((json.loads(p.read_text()) for p in bad.glob("shard-*/s*-*.json")), key=lambda r: r["pair_id"])
    shard = next(bad.glob("shard-*"))
    clean = audit(bad, AuditRule(box_min_px=3, blob_fraction=16 / 64**2))
    # 1) an unboxed 5x5 blob far from every box; 2) B := A, so no box changed; 3) manifest K off by one.
    r0 = recs[0]
    near = np.zeros((64, 64), bool)
    for d in r0["differences"]:
        x0, y0, x1, y1 = d["box"]
        near[max(0, y0 - 14) : y1 + 14, max(0, x0 - 14) : x1 + 14] = True
    ys, xs = np.nonzero(~near[:59, :59])
    assert xs.size, "no free corner for the test blob"
    y, x = int(ys[0]), int(xs[0])
    img = np.asarray(Image.open(shard / r0["images"]["b"]).convert("RGB")).copy()
    img[y : y + 5, x : x + 5] = 255 - img[y : y + 5, x : x + 5] // 4  # |delta| > 24 in the largest channel
    Image.fromarray(img).save(shard / r0["images"]["b"])
    shutil.copy(shard / recs[1]["images"]["a"], shard / recs[1]["images"]["b"])
    lines = (bad / "manifest.jsonl").read_text().splitlines()
    m = [json.loads(line) for line in lines]
    i2 = next(i for i, rec in enumerate(m) if rec["pair_id"] == recs[2]["pair_id"])
    m[i2]["num_differences"] += 1
    (bad / "manifest.jsonl").write_text("".join(json.dumps(rec) + "\n" for rec in m))

    rc, stdout, stderr = _cli(
        "--pairs", bad, "--box-min-px", 3, "--blob-fraction", 16 / 64**2, "--gallery", tmp_path / "g.png"
    )
    assert rc == 1, stderr  # flagged pairs: the check failed
    assert (
        stderr.startswith(f"python -m data_prep.audit: {bad}: pairs with an unlabeled change: ")
        and "Traceback" not in stderr
    )
    report = json.loads(stdout)
    flagged = {f["pair_id"]: f["blobs"] for f in report["unlabeled_change"]["flagged"]}
    before = {f["pair_id"] for f in clean["unlabeled_change"]["flagged"]}
    assert set(flagged) - before == {r0["pair_id"]}
    assert {"box": [x, y, x + 5, y + 5], "px": 25} in flagged[r0["pair_id"]]
    unchanged = {(b["pair_id"], b["object_id"]) for b in report["boxes"]["not_visibly_changed"]}
    assert unchanged == {(recs[1]["pair_id"], d["object_id"]) for d in recs[1]["differences"]}
    assert report["k_agreement"]["disagree"] == [recs[2]["pair_id"]]
    rows = report["gallery"]["pairs_drawn"]
    assert rows == len(flagged | {recs[1]["pair_id"]: 1})
    sheet = Image.open(tmp_path / "g.png")
    assert sheet.width == 3 * 64 + 2 * 6 and sheet.height == rows * (64 + 16 + 8)


def test_audit_cli_rejects_a_missing_folder(tmp_path):
    rc, _, stderr = _cli("--pairs", tmp_path / "nope")
    assert rc == 2 and "--pairs" in stderr
    rc, _, stderr = _cli("--pairs", tmp_path)
    assert rc == 2 and "no pair records" in stderr
