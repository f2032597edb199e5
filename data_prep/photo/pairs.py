"""DiG pairs from real photographs: ``python -m data_prep.photo --coco ANN --images DIR --num N --out-dir DIR``.

A second pair source next to the Blender renderer (``data_prep.render``), with the same output contract and run
machinery (``data_prep.runner``: manifest.jsonl, stats.json, config.json, shard folders of ``<id>_a.png``,
``<id>_b.png``, ``<id>.json``; atomic writes; reruns resume; same seeds -> same pairs). A background photo from a
COCO-format instance-segmentation set gets instances of other photos pasted with their exact masks; A and B differ
by additions, removals, colour (hue) changes, size changes and replacements, boxed from the final visible masks.
docs/photo_pairs.md has the details.
"""

from __future__ import annotations

import argparse
import concurrent.futures as futures
import dataclasses
import functools
import json
import math
import multiprocessing
import pickle
import random
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from scipy import ndimage

from data_prep import runner as R
from data_prep.manifest import manifest_entry
from data_prep.photo.coco import CocoSet, PhotoDataError, file_sha256, load_coco
from data_prep.photo.compose import Compositor, luma, mask_box, saturation
from data_prep.render import scene as S
from dig_common.cli import cli_main, tool_parser
from dig_common.fileio import atomic_write_bytes, atomic_write_text
from dig_common.yaml_error import yaml_error_line

PROG = "python -m data_prep.photo"
PHOTO_SETTINGS_FILE = Path(__file__).with_name("photo.yaml")
SOURCE = "photo"
COMPOSITOR = {"name": "photo-composite", "version": "1"}
EDIT_TYPES = ("addition", "removal", "color", "size", "replacement")
BOX_RULE = {  # in which image(s) a difference is boxed (the renderer's rule; replacement like shape)
    "addition": ("b",),
    "removal": ("a",),
    "color": ("b",),
    "size": ("a", "b"),
    "replacement": ("a", "b"),
}


class SamplingError(RuntimeError):
    """No valid layout for this candidate (counted as a rejection reason)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# ------------------------------------------------------------------------------------------------- settings


def load_settings(path: Path | str | None = None) -> dict:
    """``data_prep/photo/photo.yaml`` (or ``path``), checked: an error names the file and the key."""
    path = Path(path or PHOTO_SETTINGS_FILE)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError as err:
        raise PhotoDataError(f"photo settings file {path} not found") from err
    except yaml.YAMLError as err:
        raise PhotoDataError(f"{path}: not valid YAML: {yaml_error_line(err)}") from err
    default = yaml.safe_load(PHOTO_SETTINGS_FILE.read_text())

    def check(have, want, where):
        if isinstance(want, dict):
            if not isinstance(have, dict):
                raise PhotoDataError(f"{path}: '{where}' must be a mapping")
            unknown = set(have) - set(want)
            if unknown:
                raise PhotoDataError(f"{path}: unknown key(s) {sorted(unknown)} under '{where or 'top level'}'")
            return {k: check(have.get(k, want[k]), want[k], f"{where}.{k}".strip(".")) for k in want}
        if isinstance(want, list):
            if not isinstance(have, list) or len(have) != len(want):
                raise PhotoDataError(f"{path}: '{where}' must be a list of {len(want)}")
            return [check(h, w, f"{where}[{i}]") for i, (h, w) in enumerate(zip(have, want, strict=True))]
        if not isinstance(have, int | float) or isinstance(have, bool) or have < 0:
            raise PhotoDataError(f"{path}: '{where}' must be a number >= 0, got {have!r}")
        return have

    settings = check(raw or {}, default, "")
    for key in ("untouched", "long_side"):
        lo, hi = settings["pastes"][key]
        if lo > hi:
            raise PhotoDataError(f"{path}: 'pastes.{key}' low {lo} > high {hi}")
    if not 0 < settings["pastes"]["long_side"][1] <= 0.95:
        raise PhotoDataError(f"{path}: 'pastes.long_side' must lie in (0, 0.95]")
    if not any(settings["edits"]["weights"].values()):
        raise PhotoDataError(f"{path}: 'edits.weights' disables every edit type")
    settings["path"] = str(path)
    settings["sha256"] = file_sha256(path)
    return settings


@dataclass(kw_only=True)
class PhotoConfig(R.RunConfig):
    """A photo run: the shared run fields (``runner.RunConfig``: out, num, k, seed, width, height, workers,
    no_diff_fraction, shard, ray_address, progress) and the COCO-format set's."""

    coco: Path | str
    images: Path | str
    categories: list[str] | None = None
    settings: Path | str | None = None  # photo.yaml
    change_weights: dict[str, float] | None = None  # overrides edits.weights

    ID_PREFIX = "p"  # never collides with a rendered pair (``s...``) in a mixed stage
    MIN_SIZE = 32  # pastes need room: 32 px, not the renderer's 16

    def validate(self) -> None:
        """Raise ValueError naming the bad flag, before anything is read or written."""
        super().validate()
        if self.change_weights is not None:
            bad = set(self.change_weights) - set(EDIT_TYPES)
            if bad:
                raise ValueError(f"change_weights: unknown edit type(s) {sorted(bad)}; known: {EDIT_TYPES}")
            if not any(self.change_weights.values()):
                raise ValueError("change_weights: every edit type has weight 0")

    def render_settings(self) -> dict:
        """What stats.json records as the image settings (the renderer's key, for the same stats layout)."""
        return {**COMPOSITOR, "width": self.width, "height": self.height}

    def resume_settings(self, coco: CocoSet, settings: dict) -> dict:
        """What a rerun into the same output folder must repeat (config.json)."""
        return {
            "source": SOURCE,
            "seed": self.seed,
            "k": str(self.k),
            "width": self.width,
            "height": self.height,
            "no_diff_fraction": float(self.no_diff_fraction),
            "coco_sha256": coco.sha256,
            "categories": self.categories,
            "settings_sha256": settings["sha256"],
            "gates": gate_thresholds(settings, self.width, self.height),
            "change_weights": self.change_weights,
        }


def gate_thresholds(settings: dict, width: int, height: int) -> dict:
    """The renderer's visibility/change thresholds (vocabulary.yaml) plus the photo-specific ones."""
    shared = S.load_vocabulary().gate_thresholds(width, height)
    g = settings["gates"]
    return {
        "min_visible_px": shared["min_visible_px"],
        "min_changed_px": shared["min_changed_px"],
        "changed_intensity": shared["changed_intensity"],
        "min_visible_fraction": g["min_visible_fraction"],
        "leak_intensity": g["leak_intensity"],
        "leak_min_blob_px": max(1, math.ceil(g["leak_blob_fraction"] * width * height)),
        "leak_box_dilation_px": int(g["leak_box_dilation_px"]),
    }


# ------------------------------------------------------------------------------------------------- sampling


class Sampler:
    """Photo scene A, edits and scene B of one candidate, all determined by (COCO set, settings, seed, k)."""

    def __init__(self, coco: CocoSet, comp: Compositor, settings: dict, weights: dict[str, float], width, height):
        self.coco, self.comp, self.st, self.weights = coco, comp, settings, weights
        self.width, self.height = width, height
        self._sat: dict[int, float] = {}

    def candidate(self, seed: int, k: int) -> tuple[dict, list[dict], dict]:
        rng = random.Random(seed)
        bg_id = rng.choice(self.coco.backgrounds)
        info = self.coco.images[bg_id]
        scale = max(self.width / info.width, self.height / info.height)
        bg = {
            "image_id": bg_id,
            "x0": round(rng.uniform(0, info.width - self.width / scale), 3),
            "y0": round(rng.uniform(0, info.height - self.height / scale), 3),
            "scale": round(scale, 6),
        }
        self.next_id = 1
        pastes_a, pastes_b, recolor_a, recolor_b, edits = [], [], [], [], []
        types = [self._pick_type(rng) for _ in range(k)]
        lo, hi = self.st["pastes"]["untouched"]
        for _ in range(rng.randint(int(lo), int(hi))):
            p = self._paste(rng, bg)
            pastes_a.append(p)
            pastes_b.append(dict(p))
        for t in types:
            if t == "color" and rng.random() < self.st["edits"]["native_color_probability"]:
                native = self._native(rng, bg, recolor_a)
                if native is not None:
                    rc = {"id": self._new_id(), "ann_id": native.ann_id, "hue_deg": 0.0}
                    recolor_a.append(rc)
                    recolor_b.append(dict(rc, hue_deg=self._hue(rng)))
                    edits.append(self._edit(t, rc["id"], native))
                    continue
            if t == "color":
                p = self._paste(rng, bg, saturated=True)
                pastes_a.append(p)
                pastes_b.append(dict(p, hue_deg=self._hue(rng)))
            elif t == "addition":
                pastes_b.append(self._paste(rng, bg))
            elif t == "removal":
                pastes_a.append(self._paste(rng, bg))
            elif t == "size":
                p, q = self._resized(rng, bg)
                pastes_a.append(p)
                pastes_b.append(q)
            elif t == "replacement":
                p, q = self._replaced(rng, bg)
                pastes_a.append(p)
                pastes_b.append(q)
            last = (pastes_b if t == "addition" else pastes_a)[-1]
            edit = self._edit(t, last["id"], self.comp.instance(last["ann_id"]))
            if t == "replacement":
                new = self.comp.instance(pastes_b[-1]["ann_id"])
                edit.update(ann_id_b=new.ann_id, category_b=self.coco.categories[new.category_id])
            if t == "size":
                edit["factor"] = round(pastes_b[-1]["scale"] / pastes_a[-1]["scale"], 4)
            edits.append(edit)
        # One stacking order for both images (random, so pastes occlude each other); a B-only paste is inserted
        # at its rank too, so nothing but the edits differs between A and B.
        order = list(range(1, self.next_id))
        rng.shuffle(order)
        rank = {oid: r for r, oid in enumerate(order)}
        scene_a = {"background": bg, "recolor": recolor_a, "pastes": sorted(pastes_a, key=lambda p: rank[p["id"]])}
        scene_b = {"background": bg, "recolor": recolor_b, "pastes": sorted(pastes_b, key=lambda p: rank[p["id"]])}
        return scene_a, edits, scene_b

    def _edit(self, t: str, oid: int, inst) -> dict:
        return {
            "type": t,
            "object_id": oid,
            "ann_id": inst.ann_id,
            "image_id": inst.image_id,
            "category": self.coco.categories[inst.category_id],
        }

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id - 1

    def _pick_type(self, rng: random.Random) -> str:
        names = [t for t in EDIT_TYPES if self.weights.get(t, 0) > 0]
        return rng.choices(names, weights=[self.weights[t] for t in names])[0]

    def _hue(self, rng) -> float:
        lo, hi = self.st["edits"]["hue_deg"]
        return round(rng.uniform(lo, hi), 2)

    def _saturation(self, inst) -> float:
        if inst.ann_id not in self._sat:
            self._sat[inst.ann_id] = saturation(self.coco.image(inst.image_id), self.coco.mask(inst))
        return self._sat[inst.ann_id]

    def _instance(self, rng, saturated=False, exclude_image=None):
        for _ in range(50):
            inst = self.coco.instances[rng.randrange(len(self.coco.instances))]
            if inst.image_id == exclude_image:
                continue
            if saturated and self._saturation(inst) < self.st["edits"]["min_saturation"]:
                continue
            return inst
        raise SamplingError("no_saturated_instance" if saturated else "sampling_failed")

    def _long_side_scale(self, rng, inst, factor_max: float = 1.0) -> float:
        lo, hi = self.st["pastes"]["long_side"]
        target = rng.uniform(lo, hi) * min(self.width, self.height)
        _, _, bw, bh = inst.bbox
        scale = target / max(bw, bh)
        # the largest version of this paste must fit inside the frame with a 1 px margin
        return min(scale, (self.width - 2) / (bw * factor_max), (self.height - 2) / (bh * factor_max))

    def _place(self, rng, inst, scale, center=None) -> dict:
        _, _, bw, bh = inst.bbox
        w, h = bw * scale, bh * scale
        if center is None:
            x, y = rng.uniform(1, self.width - 1 - w), rng.uniform(1, self.height - 1 - h)
        else:  # centred on `center`, shifted back into the frame if needed
            x = min(max(center[0] - w / 2, 1), self.width - 1 - w)
            y = min(max(center[1] - h / 2, 1), self.height - 1 - h)
        return {"id": None, "ann_id": inst.ann_id, "x": round(x, 3), "y": round(y, 3), "scale": round(scale, 6)}

    def _gain(self, bg: dict, paste: dict) -> float:
        """Brightness match: mean luma of the photo under the cut-out vs the cut-out's, partly (settings)."""
        layer = self.comp.layer(paste)
        mask = layer.mask[layer.oy : layer.oy + layer.alpha.shape[0], layer.ox : layer.ox + layer.alpha.shape[1]]
        under = self.comp.background(bg)[layer.oy : layer.oy + mask.shape[0], layer.ox : layer.ox + mask.shape[1]]
        obj, photo = float(luma(layer.rgb[mask]).mean()), float(luma(under[mask]).mean())
        strength, cap = self.st["pastes"]["brightness_match"], self.st["pastes"]["max_gain"]
        gain = (max(photo, 1.0) / max(obj, 1.0)) ** strength
        return round(min(max(gain, 1 / cap), cap), 4)

    def _finish(self, bg, paste, oid=None) -> dict:
        paste["id"] = oid or self._new_id()
        paste["gain"] = self._gain(bg, paste)
        paste["hue_deg"] = 0.0
        return paste

    def _paste(self, rng, bg, saturated=False) -> dict:
        inst = self._instance(rng, saturated, exclude_image=bg["image_id"])
        return self._finish(bg, self._place(rng, inst, self._long_side_scale(rng, inst)))

    def _resized(self, rng, bg) -> tuple[dict, dict]:
        inst = self._instance(rng, exclude_image=bg["image_id"])
        ranges = self.st["edits"]["size_factor"]
        lo, hi = ranges[rng.randrange(len(ranges))]
        factor = rng.uniform(lo, hi)
        scale = self._long_side_scale(rng, inst, factor_max=max(1.0, factor))
        a = self._finish(bg, self._place(rng, inst, scale))
        _, _, bw, bh = inst.bbox
        center = (a["x"] + bw * a["scale"] / 2, a["y"] + bh * a["scale"] / 2)
        b = self._place(rng, inst, scale * factor, center)
        b.update(id=a["id"], gain=a["gain"], hue_deg=0.0)
        return a, b

    def _replaced(self, rng, bg) -> tuple[dict, dict]:
        inst = self._instance(rng, exclude_image=bg["image_id"])
        _, _, bw, bh = inst.bbox
        aspect, tol = bw / bh, self.st["edits"]["replacement_aspect"]
        categories = sorted(c for c in self.coco.by_category if c != inst.category_id)
        if not categories:
            raise SamplingError("no_replacement")
        for _ in range(int(self.st["edits"]["replacement_tries"])):  # a category, then one of its instances
            members = self.coco.by_category[categories[rng.randrange(len(categories))]]
            new = self.coco.instances[members[rng.randrange(len(members))]]
            _, _, nw, nh = new.bbox
            if new.image_id != bg["image_id"] and 1 / tol <= (nw / nh) / aspect <= tol:
                break
        else:
            raise SamplingError("no_replacement")
        scale = self._long_side_scale(rng, inst)
        a = self._finish(bg, self._place(rng, inst, scale))
        # similar size: the replacement's box gets the same area, centred where the original was
        scale_b = scale * math.sqrt((bw * bh) / (nw * nh))
        scale_b = min(scale_b, (self.width - 2) / nw, (self.height - 2) / nh)
        center = (a["x"] + bw * scale / 2, a["y"] + bh * scale / 2)
        return a, self._finish(bg, self._place(rng, new, scale_b, center), oid=a["id"])

    def _native(self, rng, bg, taken):
        """An eligible, saturated instance of the background photo lying wholly inside the crop, or None."""
        s, used = bg["scale"], {rc["ann_id"] for rc in taken}
        fits = []
        for inst in self.coco.natives.get(bg["image_id"], []):
            x, y, w, h = inst.bbox
            u0, v0, u1, v1 = (x - bg["x0"]) * s, (y - bg["y0"]) * s, (x + w - bg["x0"]) * s, (y + h - bg["y0"]) * s
            if inst.ann_id in used or u0 < 1 or v0 < 1 or u1 > self.width - 1 or v1 > self.height - 1:
                continue
            if self._saturation(inst) >= self.st["edits"]["min_saturation"]:
                fits.append(inst)
        return rng.choice(fits) if fits else None


# ---------------------------------------------------------------------------------------------------- gates


def check_pair(img_a, img_b, vis_a, vis_b, full_a, full_b, edits, gates) -> tuple[str | None, list[dict]]:
    """(rejection reason or None, differences with boxes). Boxes from the visible masks (BOX_RULE)."""
    diff = np.abs(img_a.astype(np.int16) - img_b.astype(np.int16)).max(axis=2)
    changed = diff > gates["changed_intensity"]
    height, width = diff.shape
    allowed = np.zeros_like(changed)
    differences = []
    for e in edits:
        oid = e["object_id"]
        union = np.zeros_like(changed)
        for side in BOX_RULE[e["type"]]:
            vis, full = (vis_a, full_a) if side == "a" else (vis_b, full_b)
            px, total = int(vis[oid].sum()), int(full[oid].sum())
            if px < gates["min_visible_px"]:
                return "difference_too_small", []
            if px < gates["min_visible_fraction"] * total:
                return "difference_occluded", []
            union |= vis[oid]
        x0, y0, x1, y1 = box = mask_box(union)
        changed_px = int(changed[y0:y1, x0:x1].sum())
        if changed_px < gates["min_changed_px"]:
            return "difference_unchanged", []
        d = gates["leak_box_dilation_px"]
        allowed[max(0, y0 - d) : y1 + d, max(0, x0 - d) : x1 + d] = True
        differences.append(
            {
                **{k: e[k] for k in e if k not in ("factor",)},
                "box": box,
                "visible_px_a": int(vis_a[oid].sum()) if oid in vis_a else 0,
                "visible_px_b": int(vis_b[oid].sum()) if oid in vis_b else 0,
                "changed_px": changed_px,
            }
        )
    # No unlabelled change: no 8-connected blob of clearly changed pixels outside every dilated box. (Stricter than
    # "a blob touching no dilated box": the part of a blob outside the boxes counts on its own.)
    outside = (diff > gates["leak_intensity"]) & ~allowed
    if outside.any():
        labels, n = ndimage.label(outside, structure=np.ones((3, 3), dtype=int))
        if n and np.bincount(labels.ravel())[1:].max() >= gates["leak_min_blob_px"]:
            return "change_outside_boxes", []
    return None, differences


# ------------------------------------------------------------------------------------------------- the maker


def objects_of(scene: dict, full: dict, vis: dict) -> list[dict]:
    out = []
    for item in scene["recolor"] + scene["pastes"]:
        oid = item["id"]
        out.append(
            {
                "id": oid,
                "ann_id": item["ann_id"],
                "pasted": item in scene["pastes"],
                "box": mask_box(vis[oid]),
                "visible_px": int(vis[oid].sum()),
                "mask_px": int(full[oid].sum()),
            }
        )
    return out


def encode_png(img: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG", compress_level=1)  # level 6: 2x the CPU, 2 % smaller
    return buf.getvalue()


class PhotoPairMaker:
    """Makes one accepted pair per index, resampling rejected candidates from derived seeds."""

    def __init__(self, cfg: PhotoConfig, coco: CocoSet, settings: dict, shard_dir: Path):
        self.cfg, self.coco, self.settings, self.shard_dir = cfg, coco, settings, shard_dir
        self.gates = gate_thresholds(settings, cfg.width, cfg.height)
        weights = cfg.change_weights or settings["edits"]["weights"]
        self.comp = Compositor(coco, cfg.width, cfg.height, settings["pastes"]["feather_sigma_px"])
        self.sampler = Sampler(coco, self.comp, settings, weights, cfg.width, cfg.height)

    def make(self, index: int) -> tuple[dict, dict]:
        """Returns (manifest record, stats delta). Files are complete on disk when this returns."""
        cfg, pid = self.cfg, self.cfg.pair_id(index)
        k = R.plan_k(cfg, index)
        delta = R.new_delta()
        cpu0 = time.process_time()
        attempts = int(self.settings["gates"]["max_attempts_per_pair"])
        for attempt in range(attempts):
            cand_seed = R.derive_seed("photo-candidate", cfg.seed, index, attempt)
            delta["candidates"] += 1
            self.comp.reset()  # the caches only serve A and B of one candidate
            try:
                scene_a, edits, scene_b = self.sampler.candidate(cand_seed, k)
            except SamplingError as err:
                delta["rejected"][err.reason] += 1
                continue
            img_a, full_a, vis_a = self.comp.render(scene_a)
            img_b, full_b, vis_b = self.comp.render(scene_b)
            reason, differences = check_pair(img_a, img_b, vis_a, vis_b, full_a, full_b, edits, self.gates)
            if reason:
                delta["rejected"][reason] += 1
                continue
            delta["render_cpu_s"] = round(time.process_time() - cpu0, 4)
            delta["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
            drawn = (img_a, full_a, vis_a), (img_b, full_b, vis_b)
            record = self._write(pid, index, attempt, cand_seed, k, (scene_a, edits, scene_b), differences, *drawn)
            return record, delta
        raise R.GateError(
            f"pair {pid}: no candidate passed the quality gates in {attempts} attempts (rejections: "
            f"{dict(delta['rejected'])}); relax the gates in {self.settings['path']}, lower --k or check the COCO set"
        )

    def _write(self, pid, index, attempt, cand_seed, k, scenes, differences, a, b) -> dict:
        """Write the pair's images and record; ``a``, ``b``: (image, full masks, visible masks) of each side."""
        scene_a, edits, scene_b = scenes
        cfg, bg = self.cfg, scene_a["background"]
        info = self.coco.images[bg["image_id"]]
        used = sorted({p["ann_id"] for s in (scene_a, scene_b) for p in s["pastes"] + s["recolor"]})
        final_a, final_b = self.shard_dir / f"{pid}_a.png", self.shard_dir / f"{pid}_b.png"
        record = {
            "pair_id": pid,
            "index": index,
            "seed": cand_seed,
            "source": SOURCE,
            "generator": {
                "seed": cfg.seed,
                "index": index,
                "attempt": attempt,
                "k": k,
                "coco": str(cfg.coco),
                "coco_sha256": self.coco.sha256,
                "images": str(cfg.images),
                "categories": cfg.categories,
                "settings": self.settings["path"],
                "settings_sha256": self.settings["sha256"],
                "change_weights": cfg.change_weights,
            },
            "width": cfg.width,
            "height": cfg.height,
            "renderer": {**COMPOSITOR, "settings": {"gates": self.gates, "pastes": self.settings["pastes"]}},
            "images": {"a": final_a.name, "b": final_b.name},
            "source_image": {"id": info.image_id, "file_name": info.file_name},
            "instance_ids": used,
            "scene": scene_a,
            "scene_b": scene_b,
            "edits": edits,
            "differences": differences,
            "num_differences": len(differences),
            "objects_a": objects_of(scene_a, a[1], a[2]),
            "objects_b": objects_of(scene_b, b[1], b[2]),
        }
        atomic_write_bytes(final_a, encode_png(a[0]))
        atomic_write_bytes(final_b, encode_png(b[0]))
        atomic_write_text(self.shard_dir / f"{pid}.json", json.dumps(record, indent=1))
        return manifest_entry(self.shard_dir, pid, index, differences)


# ------------------------------------------------------------------------------------------------ drivers

_PROCESS: dict = {}  # per process: the loaded COCO set (a Ray worker process keeps it between tasks)
INDEX_CACHE = "coco_index.pkl"  # in --out-dir: the checked set as the Ray driver loaded it, for its workers


def _set_key(cfg: PhotoConfig) -> tuple:
    return (str(cfg.coco), str(cfg.images), tuple(cfg.categories or ()), str(cfg.settings))


def _load(cfg: PhotoConfig, cache: Path | None = None) -> tuple[CocoSet, dict]:
    """The COCO set and settings of ``cfg``, once per process; from ``cache`` when the driver wrote one (a pickle
    of the eligible instances loads faster and in a fraction of the memory of parsing the JSON)."""
    key = _set_key(cfg)
    if _PROCESS.get("key") != key:
        settings = load_settings(cfg.settings)
        coco = None
        if cache is not None and cache.is_file():
            with open(cache, "rb") as f:
                cached = pickle.load(f)
            if cached["key"] == key and cached["settings_sha256"] == settings["sha256"]:
                coco = cached["coco"]
        if coco is None:
            coco = load_coco(cfg.coco, cfg.images, settings, cfg.categories)
        _PROCESS.update(key=key, coco=coco, settings=settings)
    return _PROCESS["coco"], _PROCESS["settings"]


def write_index_cache(cfg: PhotoConfig) -> Path:
    """Pickle the driver's loaded set into ``<out>/coco_index.pkl`` (atomic) for the Ray workers."""
    coco, settings = _load(cfg)
    path = Path(cfg.out) / INDEX_CACHE
    data = {"key": _set_key(cfg), "settings_sha256": settings["sha256"], "coco": coco}
    atomic_write_bytes(path, pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL))
    return path


def _maker(cfg: PhotoConfig) -> PhotoPairMaker:
    coco, settings = _load(cfg)
    return PhotoPairMaker(cfg, coco, settings, cfg.shard_dir)


def _pool_init(cfg: PhotoConfig) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it keeps what finished, then stops
    _PROCESS["maker"] = _maker(cfg)


def _pool_make(index: int) -> R.Result:
    return _PROCESS["maker"].make(index)


def _run_local(cfg: PhotoConfig, state: R.RunState, todo: list[int]) -> None:
    if cfg.workers == 1 or len(todo) == 1:
        R.run_local(state, todo, _maker(cfg).make, pool=None)
        return
    # fork: the workers inherit the parent's loaded COCO set (a large file is parsed once)
    ctx = multiprocessing.get_context("fork")
    with futures.ProcessPoolExecutor(cfg.workers, ctx, _pool_init, (dataclasses.replace(cfg, progress=False),)) as pool:
        R.run_local(state, todo, _pool_make, pool)


def _ray_chunk(cfg: PhotoConfig, indices: list[int]) -> list[R.Result]:
    """One Ray task: make a chunk of pairs (the COCO set is loaded once per Ray worker process)."""
    _load(cfg, Path(cfg.out) / INDEX_CACHE)
    maker = _maker(cfg)
    return [maker.make(index) for index in indices]


def _run_ray(cfg: PhotoConfig, state: R.RunState, todo: list[int]) -> None:
    write_index_cache(cfg)
    # a killed driver loses little; a task makes ~16 pairs in seconds
    R.run_ray(state, todo, _ray_chunk, (dataclasses.replace(cfg, progress=False),), cpus_per_task=1, chunk=16)


def generate(cfg: PhotoConfig) -> dict:
    """Generate (or resume) a run; returns the stats dict also written to <out>/stats.json."""
    cfg.validate()
    cfg.out = Path(cfg.out)
    coco, settings = _load(cfg)  # bad annotations, images or filters fail here, before anything is written
    state = R.RunState(cfg, cfg.resume_settings(coco, settings))
    return R.run(state, functools.partial(_run_local, cfg, state), functools.partial(_run_ray, cfg, state))


# -------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = tool_parser(PROG, __doc__)
    p.add_argument("--coco", type=Path, required=True, help="COCO-format instance annotations (JSON)")
    p.add_argument("--images", type=Path, required=True, help="folder of the images named in --coco")
    R.add_run_flags(p, workers="worker processes")
    p.add_argument("--categories", default=None, help="comma-separated category names or ids to use (default all)")
    p.add_argument(
        "--settings", type=Path, default=None, help="photo settings YAML (default data_prep/photo/photo.yaml)"
    )
    return p


@cli_main(PROG, on_interrupt=R.RESUME_HINT)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    categories = [c.strip() for c in args.categories.split(",") if c.strip()] if args.categories else None
    cfg = PhotoConfig(
        **R.run_flags(args), coco=args.coco, images=args.images, categories=categories, settings=args.settings
    )
    R.print_summary(generate(cfg))
    return 0
