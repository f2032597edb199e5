"""Scene vocabulary, seeded scene specs and edits (pure Python, no Blender)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path

import pytest
import yaml

from data_prep.render import scene as S
from data_prep.runner import parse_k


@pytest.fixture(scope="module")
def vocab():
    return S.load_vocabulary()


def test_default_vocabulary_has_required_content(vocab):
    assert {"cube", "sphere", "cylinder"} <= set(vocab.shapes)
    assert len(vocab.colors) >= 8
    assert {"rubber", "metal"} <= set(vocab.materials)
    assert len(vocab.sizes) >= 2
    assert (vocab.objects_min, vocab.objects_max) == (5, 8)
    assert set(vocab.changes) == set(S.CHANGE_TYPES)


def test_same_seed_same_spec_and_different_seed_differs(vocab):
    a1 = json.dumps(S.sample_scene(vocab, 123), sort_keys=True)
    a2 = json.dumps(S.sample_scene(vocab, 123), sort_keys=True)
    assert a1 == a2
    assert a1 != json.dumps(S.sample_scene(vocab, 124), sort_keys=True)
    scene = S.sample_scene(vocab, 123)
    assert S.sample_edits(vocab, scene, 3, 7) == S.sample_edits(vocab, scene, 3, 7)


def test_scene_layout_respects_placement_rules(vocab):
    for seed in range(40):
        spec = S.sample_scene(vocab, seed)
        objs = spec["objects"]
        assert vocab.objects_min <= len(objs) <= vocab.objects_max
        assert [o["id"] for o in objs] == list(range(1, len(objs) + 1))
        for i, a in enumerate(objs):
            assert vocab.placement["x"][0] <= a["x"] <= vocab.placement["x"][1]
            assert a["location"][2] == pytest.approx(a["scale"][2])  # resting on the ground
            for b in objs[i + 1 :]:
                gap = math.hypot(a["x"] - b["x"], a["y"] - b["y"]) - a["radius"] - b["radius"]
                assert gap >= vocab.placement["min_gap"] - 1e-6
        assert S.interpenetrating_pairs(spec) == []
        json.dumps(spec)  # JSON-ready


@pytest.mark.parametrize("k", [1, 2, 4, 9])
def test_edits_touch_k_distinct_objects_and_really_change(vocab, k):
    for seed in range(30):
        a = S.sample_scene(vocab, seed)
        edits = S.sample_edits(vocab, a, k, seed + 1000)
        assert len(edits) == k
        ids = [e["object_id"] for e in edits]
        assert len(set(ids)) == k
        b = S.apply_edits(vocab, a, edits)
        objs_a = {o["id"]: o for o in a["objects"]}
        objs_b = {o["id"]: o for o in b["objects"]}
        for e in edits:
            oid, t = e["object_id"], e["type"]
            if t == "removal":
                assert oid in objs_a and oid not in objs_b
            elif t == "addition":
                assert oid not in objs_a and oid in objs_b
            elif t == "move":
                moved = {key: v for key, v in objs_b[oid].items() if objs_a[oid][key] != v}
                assert set(moved) == {"x", "y", "location"}
            else:
                attr = {"size": "size", "shape": "shape", "material": "material", "color": "color"}[t]
                assert objs_a[oid][attr] != objs_b[oid][attr]
                render_key = {"size": "scale", "shape": "primitive", "material": "bsdf", "color": "rgb"}[t]
                if not (t == "shape" and objs_a[oid]["primitive"] == objs_b[oid]["primitive"]):
                    assert objs_a[oid][render_key] != objs_b[oid][render_key]
                derived = {attr, "radius", "primitive", "rgb", "bsdf", "location", "scale"}
                for key, value in objs_a[oid].items():
                    if key not in derived:
                        assert objs_b[oid][key] == value, key
        for oid in set(objs_a) & set(objs_b) - set(ids):
            assert objs_a[oid] == objs_b[oid]


def test_change_weights_select_types(vocab):
    a = S.sample_scene(vocab, 5)
    for t in S.CHANGE_TYPES:
        edits = S.sample_edits(vocab, a, 3, 11, weights={t: 1.0})
        assert {e["type"] for e in edits} == {t}
    counts = Counter(e["type"] for s in range(300) for e in S.sample_edits(vocab, a, 1, s))
    assert set(counts) == {t for t in S.CHANGE_TYPES if vocab.changes[t] > 0} == set(S.CHANGE_TYPES) - {"move"}
    assert min(counts.values()) > 25  # equal default weights -> roughly uniform


def test_move_is_opt_in_and_goes_to_a_free_spot(vocab):
    assert vocab.changes["move"] == 0.0  # the paper's six stay the default
    moves = 0
    for seed in range(40):
        a = S.sample_scene(vocab, seed)
        edits = S.sample_edits(vocab, a, 2, seed, weights={"move": 1.0, "addition": 1.0})
        b = S.apply_edits(vocab, a, edits)
        assert S.interpenetrating_pairs(b) == []
        objs_a, objs_b = {o["id"]: o for o in a["objects"]}, {o["id"]: o for o in b["objects"]}
        for e in edits:
            if e["type"] != "move":
                continue
            moves += 1
            old, new = objs_a[e["object_id"]], objs_b[e["object_id"]]
            assert e["from"] == [old["x"], old["y"]] and e["to"] == [new["x"], new["y"]]
            # It left its own footprint and keeps the footprint gap to every other object of B.
            assert math.hypot(new["x"] - old["x"], new["y"] - old["y"]) >= 2 * old["radius"]
            for o in b["objects"]:
                if o["id"] != new["id"]:
                    gap = math.hypot(new["x"] - o["x"], new["y"] - o["y"]) - new["radius"] - o["radius"]
                    assert gap >= vocab.placement["min_gap"] - 1e-6
            assert vocab.placement["x"][0] <= new["x"] <= vocab.placement["x"][1]
    assert moves > 20
    with pytest.raises(ValueError, match="does not apply"):
        S.apply_edits(vocab, a, [{"type": "move", "object_id": a["objects"][0]["id"], "from": [99, 99], "to": [0, 0]}])


def test_additions_do_not_collide(vocab):
    for seed in range(30):
        a = S.sample_scene(vocab, seed)
        edits = S.sample_edits(vocab, a, 3, seed, weights={"addition": 1.0})
        b = S.apply_edits(vocab, a, edits)
        assert len(b["objects"]) == len(a["objects"]) + 3
        assert S.interpenetrating_pairs(b) == []


def test_interpenetration_detected(vocab):
    a = S.sample_scene(vocab, 1)
    o1, o2 = a["objects"][0], a["objects"][1]
    o2.update(x=o1["x"] + 0.1, y=o1["y"])
    assert (o1["id"], o2["id"]) in S.interpenetrating_pairs(a)


def test_parse_k():
    assert parse_k(3) == (3, 3)
    assert parse_k("1-4") == (1, 4)
    for bad in ("0", "4-1", "a", "1-b", "-2"):
        with pytest.raises(ValueError, match="--k"):
            parse_k(bad)


def _write_vocab(tmp_path: Path, mutate) -> Path:
    raw = yaml.safe_load(S.DEFAULT_VOCAB_PATH.read_text())
    mutate(raw)
    path = tmp_path / "vocab.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    ("mutate", "key"),
    [
        (lambda r: r.pop("colors"), "colors"),
        (lambda r: r["colors"].update(red=[87, 87, 87]), "colors.red"),
        (lambda r: r["colors"].update(red=[300, 0, 0]), "colors.red[0]"),
        (lambda r: r["shapes"]["cube"].update(primitive="teapot"), "shapes.cube.primitive"),
        (lambda r: r["sizes"].update(small=0.7), "sizes"),
        (lambda r: r["materials"].update(rubber={"Metallic": 1.0, "Roughness": 0.25}), "materials.rubber"),
        (lambda r: r["changes"].update(teleport=1.0), "changes.teleport"),
        (lambda r: r.update(changes=dict.fromkeys(S.CHANGE_TYPES, 0)), "changes"),
        (lambda r: r["gates"].pop("min_visible_fraction"), "gates.min_visible_fraction"),
        (lambda r: r["objects_per_scene"].update(min=9, max=3), "objects_per_scene.max"),
        (lambda r: r["lights"][0].update(type="SPOTLIGHT"), "lights[0].type"),
        (lambda r: r.update(colours={}), "colours"),
        (lambda r: r.update(version=2), "version"),
    ],
)
def test_bad_vocabulary_names_file_and_key(tmp_path, mutate, key):
    path = _write_vocab(tmp_path, mutate)
    with pytest.raises(S.VocabularyError) as err:
        S.load_vocabulary(path)
    assert str(path) in str(err.value)
    assert f"'{key}'" in str(err.value)


def test_unreadable_vocabulary(tmp_path):
    with pytest.raises(S.VocabularyError, match="not found"):
        S.load_vocabulary(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("shapes: [unclosed")
    with pytest.raises(S.VocabularyError, match="not valid YAML"):
        S.load_vocabulary(bad)


def test_gate_thresholds_scale_with_area(vocab):
    g = vocab.gate_thresholds(480, 320)
    assert 390 <= g["min_visible_px"] <= 410
    assert 18 <= g["min_changed_px"] <= 22
    small = vocab.gate_thresholds(64, 64)
    assert small["min_visible_px"] == math.ceil(vocab.gates["min_visible_fraction"] * 64 * 64)
