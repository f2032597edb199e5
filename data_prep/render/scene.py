"""Scene vocabulary, seeded scene specs and edits for the DiG pair generator (pure Python, no bpy).

A *scene spec* is a JSON-ready dict that fully determines one Blender scene: camera, lights, ground and
objects with resolved values (sRGB colour, Principled BSDF inputs, scale, location), so the render worker
needs no vocabulary. ``sample_scene`` draws one from a seed; ``sample_edits`` picks K distinct objects and
one change each; ``apply_edits`` gives the scene spec of image B. Same seed -> same spec.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dig_common.yaml_error import yaml_error_line

DEFAULT_VOCAB_PATH = Path(__file__).with_name("vocabulary.yaml")
# The paper's six, then opt-in types (weight 0 in vocabulary.yaml unless you raise it).
CHANGE_TYPES = ("size", "shape", "material", "color", "removal", "addition", "move")
PRIMITIVES = ("cube", "sphere", "cylinder", "cone")
LIGHT_TYPES = ("AREA", "SUN")
SPEC_VERSION = 1
VOCABULARY_VERSION = 1  # the `version:` of vocabulary.yaml this loader reads


class VocabularyError(ValueError):
    """The vocabulary file is malformed; the message names the file and the key."""


class SamplingError(RuntimeError):
    """No valid layout/edit could be drawn within the configured attempts."""


@dataclass(frozen=True)
class Vocabulary:
    path: str
    shapes: dict[str, dict[str, Any]]
    colors: dict[str, list[int]]
    materials: dict[str, dict[str, float]]
    sizes: dict[str, float]
    objects_min: int
    objects_max: int
    placement: dict[str, Any]
    camera: dict[str, Any]
    ground: dict[str, Any]
    world_color: list[int]
    lights: list[dict[str, Any]]
    changes: dict[str, float]
    gates: dict[str, float]

    def gate_thresholds(self, width: int, height: int) -> dict[str, float]:
        """Pixel thresholds of the quality gates for one image size (they scale with the area)."""
        g, area = self.gates, width * height
        return {
            "min_visible_px": max(g["min_visible_floor"], math.ceil(g["min_visible_fraction"] * area)),
            "min_changed_px": max(g["min_changed_floor"], math.ceil(g["min_changed_fraction"] * area)),
            "changed_intensity": g["changed_intensity"],
            "max_untouched_visibility_change": g["max_untouched_visibility_change"],
            "untouched_change_floor_px": g["untouched_change_floor_px"],
            "frame_margin_px": g["frame_margin_px"],
            "unlabeled_intensity": g["unlabeled_change_intensity"],
            "unlabeled_min_px": max(g["unlabeled_blob_floor"], math.ceil(g["unlabeled_blob_fraction"] * area)),
            "unlabeled_dilate_px": g["unlabeled_box_dilation_px"],
        }


# ----------------------------------------------------------------------------------------------- validation


def _fail(path: str, key: str, msg: str) -> VocabularyError:
    return VocabularyError(f"{path}: key '{key}': {msg}")


def _num(path, key, value, lo=-math.inf, hi=math.inf, integer=False):
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok_type:
        raise _fail(path, key, f"expected {'an integer' if integer else 'a number'}, got {value!r}")
    if not (lo <= value <= hi) or (not integer and not math.isfinite(value)):
        raise _fail(path, key, f"value {value!r} is outside [{lo}, {hi}]")
    return int(value) if integer else float(value)


def _vec(path, key, value, n, lo=-math.inf, hi=math.inf):
    if not isinstance(value, (list, tuple)) or len(value) != n:
        raise _fail(path, key, f"expected a list of {n} numbers, got {value!r}")
    return [_num(path, f"{key}[{i}]", v, lo, hi) for i, v in enumerate(value)]


def _mapping(path, key, value, min_len=1):
    if not isinstance(value, dict) or len(value) < min_len:
        raise _fail(path, key, f"expected a mapping with at least {min_len} entries, got {value!r}")
    return value


def _rgb(path, key, value):
    rgb = _vec(path, key, value, 3, 0, 255)
    return [int(round(c)) for c in rgb]


def _bsdf(path, key, value):
    _mapping(path, key, value)
    return {str(k): _num(path, f"{key}.{k}", v) for k, v in value.items()}


REQUIRED_KEYS = (
    "shapes",
    "colors",
    "materials",
    "sizes",
    "objects_per_scene",
    "placement",
    "camera",
    "ground",
    "lights",
    "changes",
    "gates",
)
GATE_KEYS = {
    "min_visible_fraction": (0.0, 1.0, False),
    "min_visible_floor": (0, 10**9, True),
    "min_changed_fraction": (0.0, 1.0, False),
    "min_changed_floor": (0, 10**9, True),
    "changed_intensity": (0, 254, True),
    "max_untouched_visibility_change": (0.0, 10.0, False),
    "untouched_change_floor_px": (0, 10**9, True),
    "frame_margin_px": (0, 10**6, True),
    "unlabeled_change_intensity": (0, 254, True),
    "unlabeled_blob_fraction": (0.0, 1.0, False),
    "unlabeled_blob_floor": (1, 10**9, True),
    "unlabeled_box_dilation_px": (0, 10**6, True),
    "max_attempts_per_pair": (1, 10**6, True),
}


def load_vocabulary(path: str | Path | None = None) -> Vocabulary:
    """Load and validate a vocabulary YAML file; raise VocabularyError naming the file and the bad key."""
    path = Path(path) if path is not None else DEFAULT_VOCAB_PATH
    p = str(path)
    if not path.is_file():
        raise VocabularyError(f"{p}: vocabulary file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise VocabularyError(f"{p}: not valid YAML: {yaml_error_line(exc)}") from exc
    if not isinstance(raw, dict):
        raise VocabularyError(f"{p}: expected a mapping at the top level")
    for key in REQUIRED_KEYS:
        if key not in raw:
            raise _fail(p, key, "missing")
    unknown = set(raw) - set(REQUIRED_KEYS) - {"version", "world_color"}
    if unknown:
        raise _fail(p, sorted(unknown)[0], f"unknown key (known: {', '.join(REQUIRED_KEYS)}, version, world_color)")
    if raw.get("version", VOCABULARY_VERSION) != VOCABULARY_VERSION:
        raise _fail(p, "version", f"{raw['version']!r} is not supported (this generator reads {VOCABULARY_VERSION})")

    shapes = {}
    for name, s in _mapping(p, "shapes", raw["shapes"]).items():
        _mapping(p, f"shapes.{name}", s)
        prim = s.get("primitive")
        if prim not in PRIMITIVES:
            raise _fail(p, f"shapes.{name}.primitive", f"must be one of {PRIMITIVES}, got {prim!r}")
        shapes[str(name)] = {"primitive": prim, "scale": _num(p, f"shapes.{name}.scale", s.get("scale", 1.0), 0.01, 1)}

    colors = {str(n): _rgb(p, f"colors.{n}", v) for n, v in _mapping(p, "colors", raw["colors"]).items()}
    seen: dict[tuple, str] = {}
    for n, v in colors.items():
        if tuple(v) in seen:
            raise _fail(
                p, f"colors.{n}", f"same value as colors.{seen[tuple(v)]}: a colour change would change nothing"
            )
        seen[tuple(v)] = n

    materials = {str(n): _bsdf(p, f"materials.{n}", v) for n, v in _mapping(p, "materials", raw["materials"]).items()}
    for i, (n, v) in enumerate(materials.items()):
        for m, w in list(materials.items())[:i]:
            if v == w:
                raise _fail(
                    p, f"materials.{n}", f"same values as materials.{m}: a material change would change nothing"
                )
    sizes = {str(n): _num(p, f"sizes.{n}", v, 0.05, 3.0) for n, v in _mapping(p, "sizes", raw["sizes"]).items()}
    if len(set(sizes.values())) != len(sizes):
        raise _fail(p, "sizes", "radii must be distinct: a size change would change nothing")

    ops = _mapping(p, "objects_per_scene", raw["objects_per_scene"])
    omin = _num(p, "objects_per_scene.min", ops.get("min"), 1, 50, integer=True)
    omax = _num(p, "objects_per_scene.max", ops.get("max"), omin, 50, integer=True)

    pl = _mapping(p, "placement", raw["placement"])
    area = _mapping(p, "placement.area", pl.get("area"))
    placement = {
        "x": _vec(p, "placement.area.x", area.get("x"), 2),
        "y": _vec(p, "placement.area.y", area.get("y"), 2),
        "min_gap": _num(p, "placement.min_gap", pl.get("min_gap", 0.25), 0, 10),
        "margin": _num(p, "placement.margin", pl.get("margin", 0.0), 0, 10),
        "max_attempts": _num(p, "placement.max_attempts", pl.get("max_attempts", 200), 1, 10**6, integer=True),
        "rotation_deg": _vec(p, "placement.rotation_deg", pl.get("rotation_deg", [0, 360]), 2),
    }
    for ax in ("x", "y"):
        if placement[ax][0] >= placement[ax][1]:
            raise _fail(p, f"placement.area.{ax}", "expected [low, high] with low < high")

    cam = _mapping(p, "camera", raw["camera"])
    camera = {
        "location": _vec(p, "camera.location", cam.get("location"), 3),
        "look_at": _vec(p, "camera.look_at", cam.get("look_at"), 3),
        "lens_mm": _num(p, "camera.lens_mm", cam.get("lens_mm", 35.0), 1, 1000),
        "sensor_width_mm": _num(p, "camera.sensor_width_mm", cam.get("sensor_width_mm", 36.0), 1, 1000),
        "location_jitter": _num(p, "camera.location_jitter", cam.get("location_jitter", 0.0), 0, 10),
    }
    gr = _mapping(p, "ground", raw["ground"])
    ground = {
        "color": _rgb(p, "ground.color", gr.get("color")),
        "bsdf": _bsdf(p, "ground.material", gr.get("material")),
    }
    world_color = _rgb(p, "world_color", raw.get("world_color", [0, 0, 0]))

    if not isinstance(raw["lights"], list) or not raw["lights"]:
        raise _fail(p, "lights", "expected a non-empty list")
    lights = []
    for i, lt in enumerate(raw["lights"]):
        k = f"lights[{i}]"
        _mapping(p, k, lt)
        if lt.get("type") not in LIGHT_TYPES:
            raise _fail(p, f"{k}.type", f"must be one of {LIGHT_TYPES}, got {lt.get('type')!r}")
        lights.append(
            {
                "name": str(lt.get("name", f"light{i}")),
                "type": lt["type"],
                "energy": _num(p, f"{k}.energy", lt.get("energy"), 0, 1e6),
                "size": _num(p, f"{k}.size", lt.get("size", 1.0), 0, 100),
                "location": _vec(p, f"{k}.location", lt.get("location"), 3),
                "location_jitter": _num(p, f"{k}.location_jitter", lt.get("location_jitter", 0.0), 0, 10),
            }
        )

    ch = _mapping(p, "changes", raw["changes"])
    for name in ch:
        if name not in CHANGE_TYPES:
            raise _fail(p, f"changes.{name}", f"unknown change type (known: {', '.join(CHANGE_TYPES)})")
    changes = {t: _num(p, f"changes.{t}", ch.get(t, 0.0), 0, 1e6) for t in CHANGE_TYPES}
    if sum(changes.values()) <= 0:
        raise _fail(p, "changes", "at least one change type needs a positive weight")

    gates_raw = _mapping(p, "gates", raw["gates"])
    for name in gates_raw:
        if name not in GATE_KEYS:
            raise _fail(p, f"gates.{name}", f"unknown gate (known: {', '.join(GATE_KEYS)})")
    gates = {}
    for name, (lo, hi, integer) in GATE_KEYS.items():
        if name not in gates_raw:
            raise _fail(p, f"gates.{name}", "missing")
        gates[name] = _num(p, f"gates.{name}", gates_raw[name], lo, hi, integer=integer)

    return Vocabulary(
        path=p,
        shapes=shapes,
        colors=colors,
        materials=materials,
        sizes=sizes,
        objects_min=omin,
        objects_max=omax,
        placement=placement,
        camera=camera,
        ground=ground,
        world_color=world_color,
        lights=lights,
        changes=changes,
        gates=gates,
    )


# ----------------------------------------------------------------------------------------------- layout


def _object(vocab: Vocabulary, oid: int, shape: str, color: str, material: str, size: str, x, y, rot) -> dict:
    """Resolved object entry of a scene spec."""
    obj = {
        "id": oid,
        "shape": shape,
        "color": color,
        "material": material,
        "size": size,
        "x": x,
        "y": y,
        "rotation_deg": rot,
    }
    return resolve_object(vocab, obj)


def resolve_object(vocab: Vocabulary, obj: dict) -> dict:
    """(Re)compute the derived render values of an object from its attribute names."""
    obj = dict(obj)
    shape = vocab.shapes[obj["shape"]]
    radius = vocab.sizes[obj["size"]]
    s = radius * shape["scale"]
    obj.update(
        primitive=shape["primitive"],
        radius=radius,
        rgb=list(vocab.colors[obj["color"]]),
        bsdf=dict(vocab.materials[obj["material"]]),
        location=[round(obj["x"], 6), round(obj["y"], 6), round(s, 6)],  # rests on the ground
        scale=[round(s, 6)] * 3,
    )
    return obj


def _camera_axes(vocab: Vocabulary) -> tuple[tuple[float, float], tuple[float, float]]:
    """Horizontal unit vectors 'left' and 'behind' of the (unjittered) camera, for the margin rule."""
    cx, cy, _ = vocab.camera["location"]
    tx, ty, _ = vocab.camera["look_at"]
    fx, fy = tx - cx, ty - cy
    n = math.hypot(fx, fy) or 1.0
    behind = (fx / n, fy / n)
    left = (-behind[1], behind[0])
    return left, behind


def placement_ok(vocab: Vocabulary, obj: dict, others: list[dict], check_margin: bool = True) -> bool:
    """Sampling rule: footprints keep min_gap apart and, optionally, CLEVR's directional margin."""
    left, behind = _camera_axes(vocab)
    margin = vocab.placement["margin"]
    for o in others:
        dx, dy = obj["x"] - o["x"], obj["y"] - o["y"]
        if math.hypot(dx, dy) - obj["radius"] - o["radius"] < vocab.placement["min_gap"]:
            return False
        if check_margin and margin > 0:
            for ax in (left, behind):
                if abs(dx * ax[0] + dy * ax[1]) < margin:
                    return False
    return True


def interpenetrating_pairs(spec: dict) -> list[tuple[int, int]]:
    """Pairs of object ids whose footprint circles overlap (the interpenetration gate)."""
    objs = spec["objects"]
    bad = []
    for i, a in enumerate(objs):
        for b in objs[i + 1 :]:
            if math.hypot(a["x"] - b["x"], a["y"] - b["y"]) < a["radius"] + b["radius"] - 1e-9:
                bad.append((a["id"], b["id"]))
    return bad


def _random_attrs(vocab: Vocabulary, rng: random.Random) -> tuple[str, str, str, str]:
    return (
        rng.choice(sorted(vocab.shapes)),
        rng.choice(sorted(vocab.colors)),
        rng.choice(sorted(vocab.materials)),
        rng.choice(sorted(vocab.sizes)),
    )


def _place(vocab, rng, oid, others, attrs=None, check_margin=True) -> dict | None:
    pl = vocab.placement
    shape, color, material, size = attrs or _random_attrs(vocab, rng)
    for _ in range(pl["max_attempts"]):
        x = rng.uniform(*pl["x"])
        y = rng.uniform(*pl["y"])
        rot = rng.uniform(*pl["rotation_deg"])
        obj = _object(vocab, oid, shape, color, material, size, round(x, 4), round(y, 4), round(rot, 3))
        if placement_ok(vocab, obj, others, check_margin):
            return obj
    return None


def _jitter(rng, vec, amount):
    return [round(v + rng.uniform(-amount, amount), 4) for v in vec]


def sample_scene(vocab: Vocabulary, seed: int, num_objects: int | None = None) -> dict:
    """Seeded scene spec of image A."""
    rng = random.Random(seed)
    n = num_objects if num_objects is not None else rng.randint(vocab.objects_min, vocab.objects_max)
    cam = vocab.camera
    camera = {
        "location": _jitter(rng, cam["location"], cam["location_jitter"]),
        "look_at": list(cam["look_at"]),
        "lens_mm": cam["lens_mm"],
        "sensor_width_mm": cam["sensor_width_mm"],
    }
    lights = [
        {k: v for k, v in lt.items() if k != "location_jitter"}
        | {"location": _jitter(rng, lt["location"], lt["location_jitter"])}
        for lt in vocab.lights
    ]
    for _ in range(100):  # redraw the whole layout if one object finds no room
        objects: list[dict] = []
        for oid in range(1, n + 1):
            obj = _place(vocab, rng, oid, objects)
            if obj is None:
                break
            objects.append(obj)
        if len(objects) == n:
            break
    else:
        raise SamplingError(f"could not place {n} objects with the placement rules of {vocab.path}")
    return {
        "version": SPEC_VERSION,
        "seed": seed,
        "camera": camera,
        "lights": lights,
        "ground": {"rgb": list(vocab.ground["color"]), "bsdf": dict(vocab.ground["bsdf"])},
        "world_rgb": list(vocab.world_color),
        "objects": objects,
    }


# ------------------------------------------------------------------------------------------------ edits


def _pick_type(rng: random.Random, weights: dict[str, float], allowed: list[str]) -> str | None:
    cand = [t for t in CHANGE_TYPES if t in allowed and weights.get(t, 0) > 0]
    if not cand:
        return None
    return rng.choices(cand, weights=[weights[t] for t in cand])[0]


def sample_edits(vocab: Vocabulary, scene: dict, k: int, seed: int, weights: dict[str, float] | None = None) -> list:
    """K edits on K distinct objects (an addition is a new object), one change each.

    Every edit really changes its attribute (new value != old value). Types are drawn by weight among
    those still possible (e.g. no removal once every object is edited; no shape change with one shape).
    """
    rng = random.Random(seed)
    weights = dict(vocab.changes if weights is None else weights)
    unknown = set(weights) - set(CHANGE_TYPES)
    if unknown:
        raise ValueError(f"unknown change type(s) {sorted(unknown)}; known: {CHANGE_TYPES}")
    free = [o["id"] for o in scene["objects"]]
    rng.shuffle(free)
    next_id = max((o["id"] for o in scene["objects"]), default=0) + 1
    edits = []
    by_id = {o["id"]: o for o in scene["objects"]}
    attr_of = {
        "size": ("size", vocab.sizes),
        "shape": ("shape", vocab.shapes),
        "material": ("material", vocab.materials),
        "color": ("color", vocab.colors),
    }
    for _ in range(k):
        allowed = ["addition"]
        if free:
            allowed += ["removal", "move"]
            allowed += [t for t, (_, table) in attr_of.items() if len(table) > 1]
        t = _pick_type(rng, weights, allowed)
        if t is None:
            raise SamplingError(f"no change type with positive weight is possible (weights {weights})")
        if t == "addition":
            edits.append({"type": "addition", "object_id": next_id})
            next_id += 1
            continue
        oid = free.pop()
        if t == "removal":
            edits.append({"type": "removal", "object_id": oid})
            continue
        if t == "move":  # the new spot is drawn once every other edit is known (below)
            edits.append({"type": "move", "object_id": oid, "from": [by_id[oid]["x"], by_id[oid]["y"]]})
            continue
        attr, table = attr_of[t]
        old = by_id[oid][attr]
        new = rng.choice(sorted(v for v in table if v != old))
        edits.append({"type": t, "object_id": oid, "attribute": attr, "from": old, "to": new})
    # Moves and additions are placed after all other edits are known, so that they avoid the objects of B.
    return _place_additions(vocab, scene, edits, rng)


def _place_move(vocab, rng, obj, others):
    """A new spot for `obj`: clear of every other object of B (footprint gap, and the margin if it can) and
    of its own old footprint, so that the move is visible and the A and B silhouettes differ."""
    attrs = (obj["shape"], obj["color"], obj["material"], obj["size"])
    ghost = dict(obj, id=-1)  # the old spot: the moved object must not overlap where it was
    for check_margin in (True, False):  # in a crowded scene the footprint gap suffices
        new = _place(vocab, rng, obj["id"], [*others, ghost], attrs, check_margin)
        if new is not None:
            return dict(new, rotation_deg=obj["rotation_deg"])  # same object, only its position changes
    return None


def _place_additions(vocab, scene, edits, rng):
    pending = ("addition", "move")
    b_objects = [o for o in apply_edits(vocab, scene, [e for e in edits if e["type"] not in pending])["objects"]]
    out = []
    for e in edits:
        if e["type"] == "move":
            old = next(o for o in b_objects if o["id"] == e["object_id"])
            others = [o for o in b_objects if o["id"] != e["object_id"]]
            new = _place_move(vocab, rng, old, others)
            if new is None:
                raise SamplingError(f"no free spot to move object {e['object_id']} to")
            b_objects = [*others, new]
            e = dict(e, to=[new["x"], new["y"]])
        elif e["type"] == "addition":
            # An added object keeps the margin if it can; in a crowded scene the footprint gap suffices.
            obj = _place(vocab, rng, e["object_id"], b_objects) or _place(
                vocab, rng, e["object_id"], b_objects, check_margin=False
            )
            if obj is None:
                raise SamplingError("no room for an added object")
            b_objects.append(obj)
            e = dict(e, object={k: obj[k] for k in ("shape", "color", "material", "size", "x", "y", "rotation_deg")})
        out.append(e)
    return out


def apply_edits(vocab: Vocabulary, scene: dict, edits: list[dict]) -> dict:
    """Scene spec of image B: object ids are kept; removed objects disappear; added ones get new ids."""
    b = copy.deepcopy(scene)
    objs = {o["id"]: o for o in b["objects"]}
    for e in edits:
        oid, t = e["object_id"], e["type"]
        if t == "removal":
            del objs[oid]
        elif t == "addition":
            if "object" not in e:
                continue  # not placed yet (internal use by sample_edits)
            objs[oid] = resolve_object(vocab, {"id": oid, **e["object"]})
        elif t == "move":
            if "to" not in e:
                continue  # not placed yet (internal use by sample_edits)
            o = dict(objs[oid])
            if [o["x"], o["y"]] != list(e["from"]) or list(e["from"]) == list(e["to"]):
                raise ValueError(f"edit {e} does not apply to object {o}")
            o["x"], o["y"] = e["to"]
            objs[oid] = resolve_object(vocab, o)
        else:
            o = dict(objs[oid])
            if o[e["attribute"]] != e["from"] or e["from"] == e["to"]:
                raise ValueError(f"edit {e} does not apply to object {o}")
            o[e["attribute"]] = e["to"]
            objs[oid] = resolve_object(vocab, o)
    b["objects"] = [objs[i] for i in sorted(objs)]
    return b
