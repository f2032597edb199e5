"""Blender render worker for DiG pairs. Runs ONLY in the render venv (bpy 5.0.1, numpy<2, OpenEXR).

Long-lived: reads one JSON job per line on stdin and answers one JSON line on its original stdout, so the
~1 s start-up of bpy is paid once per worker. Blender's own prints go to stderr (stdout fd is redirected).

Commands: {"cmd": "device", "device": cpu|cuda|optix|hip|auto} (once, before rendering), {"cmd": "info"},
{"cmd": "quit"}; otherwise a render job:
Job: {"id", "scene_a", "scene_b", "differences": [{"type", "object_id"}], "render": {...}, "gates": {...},
      "out_a", "out_b", "save_masks": optional path prefix}
Answer: {"id", "ok": true, "accepted", "reason", "detail", "differences": [...], "objects_a", "objects_b",
         "timing", "renderer", "peak_rss_mb"} or {"id", "ok": false, "error"}.

The GT logic (``evaluate_pair``) is numpy-only and importable without bpy; bpy/OpenEXR are imported lazily.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import tempfile
import time
import traceback

import numpy as np

SILHOUETTE_TYPES = ("size", "shape", "move")  # boxed as the union of the A and B boxes
BOX_IN_A = ("removal",)
BOX_IN_B = ("addition", "color", "material")


# ---------------------------------------------------------------------------------- GT and gates (numpy)


def mask_objects(ids: np.ndarray) -> dict[int, dict]:
    """{id: {"box": [x0, y0, x1, y1] (x1/y1 exclusive), "px": visible pixels}} for ids > 0."""
    out = {}
    for i in np.unique(ids):
        if i <= 0:
            continue
        ys, xs = np.nonzero(ids == i)
        out[int(i)] = {"box": [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1], "px": int(xs.size)}
    return out


def unlabeled_blobs(img_a, img_b, boxes, intensity=24, min_px=154, dilate_px=8) -> list[dict]:
    """Visible changes between A and B that no GT box accounts for.

    A blob is an 8-connected set of pixels whose largest channel changes by more than `intensity` (8-bit);
    it is unlabeled when it has >= `min_px` pixels and touches no GT box grown by `dilate_px` on every side.
    Returns [{"box": [x0, y0, x1, y1], "px": n}] (x1/y1 exclusive), largest first. Shared by the
    `unlabeled_change` gate and `python -m data_prep.audit`, so both apply the same rule.
    """
    from scipy import ndimage  # in both venvs; imported here so that the module loads without it

    changed = np.abs(img_a.astype(np.int16) - img_b.astype(np.int16)).max(axis=-1) > intensity
    labels, n = ndimage.label(changed, structure=np.ones((3, 3), dtype=bool))
    if n == 0:
        return []
    h, w = changed.shape
    near_box = np.zeros_like(changed)
    for x0, y0, x1, y1 in boxes:
        near_box[max(0, y0 - dilate_px) : min(h, y1 + dilate_px), max(0, x0 - dilate_px) : min(w, x1 + dilate_px)] = (
            True
        )
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    touching = np.zeros(n + 1, dtype=bool)
    touching[np.unique(labels[near_box])] = True
    out = []
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is not None and sizes[i] >= min_px and not touching[i]:
            out.append({"box": [sl[1].start, sl[0].start, sl[1].stop, sl[0].stop], "px": int(sizes[i])})
    return sorted(out, key=lambda b: -b["px"])


def srgb8_to_lab(rgb: np.ndarray) -> np.ndarray:
    """8-bit sRGB (..., 3) -> CIE L*a*b* (D65 white)."""
    c = rgb.astype(np.float64) / 255.0
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array(
        [
            [0.4124564, 0.3575761, 0.1804375],
            [0.2126729, 0.7151522, 0.0721750],
            [0.0193339, 0.1191920, 0.9503041],
        ]
    )
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def delta_e_ciede2000(lab1: np.ndarray, lab2: np.ndarray) -> np.ndarray:
    """CIEDE2000 colour difference (kL = kC = kH = 1) of L*a*b* arrays (..., 3) (Sharma, Wu, Dalal 2005)."""
    L1, a1, b1 = np.moveaxis(lab1, -1, 0)
    L2, a2, b2 = np.moveaxis(lab2, -1, 0)
    c_bar = (np.hypot(a1, b1) + np.hypot(a2, b2)) / 2
    g = 0.5 * (1 - np.sqrt(c_bar**7 / (c_bar**7 + 25.0**7)))
    a1p, a2p = (1 + g) * a1, (1 + g) * a2
    c1p, c2p = np.hypot(a1p, b1), np.hypot(a2p, b2)
    h1p = np.degrees(np.arctan2(b1, a1p)) % 360
    h2p = np.degrees(np.arctan2(b2, a2p)) % 360
    dL, dC = L2 - L1, c2p - c1p
    dh = h2p - h1p
    dh = np.where(dh > 180, dh - 360, np.where(dh < -180, dh + 360, dh))
    dh = np.where(c1p * c2p == 0, 0.0, dh)
    dH = 2 * np.sqrt(c1p * c2p) * np.sin(np.radians(dh / 2))
    L_bar, cp_bar = (L1 + L2) / 2, (c1p + c2p) / 2
    hsum = h1p + h2p
    h_bar = np.where(np.abs(h1p - h2p) > 180, np.where(hsum < 360, hsum + 360, hsum - 360), hsum) / 2
    h_bar = np.where(c1p * c2p == 0, hsum, h_bar)
    t = (
        1
        - 0.17 * np.cos(np.radians(h_bar - 30))
        + 0.24 * np.cos(np.radians(2 * h_bar))
        + 0.32 * np.cos(np.radians(3 * h_bar + 6))
        - 0.20 * np.cos(np.radians(4 * h_bar - 63))
    )
    s_l = 1 + 0.015 * (L_bar - 50) ** 2 / np.sqrt(20 + (L_bar - 50) ** 2)
    s_c, s_h = 1 + 0.045 * cp_bar, 1 + 0.015 * cp_bar * t
    r_t = (
        -2 * np.sqrt(cp_bar**7 / (cp_bar**7 + 25.0**7)) * np.sin(np.radians(60 * np.exp(-(((h_bar - 275) / 25) ** 2))))
    )
    return np.sqrt((dL / s_l) ** 2 + (dC / s_c) ** 2 + (dH / s_h) ** 2 + r_t * (dC / s_c) * (dH / s_h))


def hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of 2-D points (monotone chain + shoelace)."""
    pts = sorted(set(map(tuple, np.round(np.asarray(points, dtype=np.float64), 4).tolist())))
    if len(pts) < 3:
        return 0.0

    def half(seq):
        out = []
        for p in seq:
            while (
                len(out) >= 2
                and (out[-1][0] - out[-2][0]) * (p[1] - out[-2][1]) - (out[-1][1] - out[-2][1]) * (p[0] - out[-2][0])
                <= 0
            ):
                out.pop()
            out.append(p)
        return out[:-1]

    hull = np.array(half(pts) + half(pts[::-1]))
    x, y = hull[:, 0], hull[:, 1]
    return float(abs(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))) / 2)


def difficulty(d: dict, img_size, silhouettes, mask_a, mask_b, img_a, img_b) -> dict:
    """How hard one difference is to see (recorded next to its box; stage filters and eval bins use it).

    visible_px: visible pixels where it is boxed (A for removal, B for addition/colour/material, the larger
    for size/shape/move); occluded_fraction: 1 - visible / unoccluded silhouette (projected convex hull) in
    that image; delta_e00: mean CIEDE2000 between A and B over the object's pixels visible in both (colour
    changes only); size_ratio: visible px in B / in A (None if absent in one); box_fraction: box area /
    image area; border_px: distance of the box to the nearest image edge."""
    t, oid, box = d["type"], d["object_id"], d["box"]
    w, h = img_size
    px_a, px_b = d["visible_px_a"], d["visible_px_b"]
    sides = ["a"] if t in BOX_IN_A else ["b"] if t in BOX_IN_B else ["a", "b"]
    visible = max(px_a if s == "a" else px_b for s in sides)
    occluded = []
    for s, px in (("a", px_a), ("b", px_b)):
        sil = (silhouettes or {}).get(s, {}).get(oid)
        if s in sides and sil and px:
            occluded.append(min(1.0, max(0.0, 1.0 - px / sil)))
    delta_e = None
    if t == "color" and img_a is not None:
        both = (mask_a == oid) & (mask_b == oid)
        if both.any():
            delta_e = float(delta_e_ciede2000(srgb8_to_lab(img_a[both]), srgb8_to_lab(img_b[both])).mean())
    out = {
        "visible_px": int(visible),
        "occluded_fraction": round(max(occluded), 4) if occluded else None,
        "delta_e00": None if delta_e is None else round(delta_e, 3),
        "size_ratio": round(px_b / px_a, 4) if px_a and px_b else None,
        "box_fraction": None,
        "border_px": None,
    }
    if box:
        out["box_fraction"] = round((box[2] - box[0]) * (box[3] - box[1]) / (w * h), 6)
        out["border_px"] = int(min(box[0], box[1], w - box[2], h - box[3]))
    return out


def _union(boxes):
    return [min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes)]


def evaluate_pair(mask_a, mask_b, img_a, img_b, differences, untouched_ids, gates, silhouettes=None) -> dict:
    """Boxes per docs/contracts.md, pair record and the pixel quality gates. Returns accepted/reason/detail/differences/objects."""
    objs_a, objs_b = mask_objects(mask_a), mask_objects(mask_b)
    masks_only = img_a is None  # pre-pass: visibility gates only
    if not masks_only:
        changed = np.abs(img_a.astype(np.int16) - img_b.astype(np.int16)).max(axis=-1) > gates["changed_intensity"]
    result = {
        "accepted": True,
        "reason": None,
        "detail": "",
        "differences": [],
        "objects_a": objs_a,
        "objects_b": objs_b,
    }

    def reject(reason, detail):
        if result["accepted"]:
            result.update(accepted=False, reason=reason, detail=detail)

    for d in differences:
        t, oid = d["type"], d["object_id"]
        a, b = objs_a.get(oid), objs_b.get(oid)
        px_a, px_b = (a["px"] if a else 0), (b["px"] if b else 0)
        if t in BOX_IN_A:
            boxes, visible = ([a["box"]] if a else []), px_a
        elif t in BOX_IN_B:
            boxes, visible = ([b["box"]] if b else []), px_b
        elif t in SILHOUETTE_TYPES:
            boxes, visible = [m["box"] for m in (a, b) if m], max(px_a, px_b)
        else:
            raise ValueError(f"unknown change type {t!r}")
        if not boxes or visible < gates["min_visible_px"]:
            reject("difference_too_small", f"{t} of object {oid}: {visible} px visible < {gates['min_visible_px']}")
            box, changed_px = (_union(boxes) if boxes else None), 0
        else:
            box = _union(boxes)
            changed_px = 0 if masks_only else int(changed[box[1] : box[3], box[0] : box[2]].sum())
            if not masks_only and changed_px < gates["min_changed_px"]:
                reject(
                    "difference_unchanged", f"{t} of object {oid}: {changed_px} px changed < {gates['min_changed_px']}"
                )
        diff = {
            "type": t,
            "object_id": oid,
            "box": box,
            "visible_px_a": px_a,
            "visible_px_b": px_b,
            "changed_px": changed_px,
        }
        if not masks_only:
            diff["difficulty"] = difficulty(diff, mask_a.shape[::-1], silhouettes, mask_a, mask_b, img_a, img_b)
        result["differences"].append(diff)

    if not masks_only and "unlabeled_min_px" in gates:
        # Reflections, shadows or light bounces on untouched objects that changed visibly but carry no box.
        blobs = unlabeled_blobs(
            img_a,
            img_b,
            [d["box"] for d in result["differences"] if d["box"]],
            gates["unlabeled_intensity"],
            gates["unlabeled_min_px"],
            gates["unlabeled_dilate_px"],
        )
        if blobs:
            reject("unlabeled_change", f"{len(blobs)} changed blob(s) outside every GT box, largest {blobs[0]}")

    for oid in untouched_ids:
        pa = objs_a.get(oid, {}).get("px", 0)
        pb = objs_b.get(oid, {}).get("px", 0)
        allowed = max(gates["untouched_change_floor_px"], gates["max_untouched_visibility_change"] * max(pa, pb))
        if abs(pa - pb) > allowed:
            reject("untouched_visibility_changed", f"untouched object {oid}: visible px {pa} -> {pb}")
    return result


# ------------------------------------------------------------------------------------------------ Blender


def srgb_to_linear(rgb255):
    out = []
    for c in rgb255:
        c = c / 255.0
        out.append(c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4)
    return out


class BlenderScene:
    """One Blender scene reused for every job: objects are pooled by id and synced to each spec in place."""

    def __init__(self):
        import bpy

        self.bpy = bpy
        bpy.ops.wm.read_factory_settings(use_empty=True)
        self.scn = bpy.context.scene
        self.objects = {}  # id -> bpy object
        self.lights = {}
        self.meshes = self._make_meshes()
        self.tmpdir = tempfile.mkdtemp(prefix=f"dig-render-{os.getpid()}-")
        self.exr_path = os.path.join(self.tmpdir, "pass.exr")  # one per worker: shared names corrupt masks

        g = bpy.data.meshes.new("ground")
        s = 50.0
        g.from_pydata([(-s, -s, 0), (s, -s, 0), (s, s, 0), (-s, s, 0)], [], [(0, 1, 2, 3)])
        self.ground_mat = self._material("ground")
        g.materials.append(self.ground_mat)
        self._link(bpy.data.objects.new("ground", g))  # pass_index 0 = background

        world = bpy.data.worlds.new("world")
        world.use_nodes = True
        self.scn.world = world
        cam = bpy.data.objects.new("camera", bpy.data.cameras.new("camera"))
        self._link(cam)
        self.scn.camera = cam
        self.scn.view_layers[0].use_pass_object_index = True
        vs = self.scn.view_settings
        vs.view_transform, vs.look, vs.exposure, vs.gamma = "Standard", "None", 0.0, 1.0
        r = self.scn.render
        r.engine = "CYCLES"
        r.resolution_percentage = 100
        r.use_persistent_data = True
        r.use_compositing = False
        r.threads_mode = "FIXED"
        for p in r.bl_rna.properties:
            if p.identifier.startswith("use_stamp"):
                setattr(r, p.identifier, False)
        c = self.scn.cycles
        c.device = "CPU"
        c.use_adaptive_sampling = False
        c.use_animated_seed = False

    def _link(self, ob):
        self.scn.collection.objects.link(ob)
        return ob

    def _make_meshes(self):
        bpy = self.bpy
        ops = {
            "cube": bpy.ops.mesh.primitive_cube_add,
            "sphere": bpy.ops.mesh.primitive_uv_sphere_add,
            "cylinder": bpy.ops.mesh.primitive_cylinder_add,
            "cone": bpy.ops.mesh.primitive_cone_add,
        }
        meshes = {}
        for name, op in ops.items():
            op()
            ob = bpy.context.object
            me = ob.data
            bpy.data.objects.remove(ob)
            me.name = name
            me.materials.append(None)  # one slot, filled per object
            if name != "cube":
                me.shade_smooth()
                me.set_sharp_from_angle(angle=math.radians(40))  # smooth sides, crisp cap edges
            meshes[name] = me
        return meshes

    def _material(self, name):
        m = self.bpy.data.materials.new(name)
        m.use_nodes = True
        bsdf = m.node_tree.nodes["Principled BSDF"]
        # Defaults of every numeric input, restored before a spec's values so that materials never leak.
        m["defaults"] = [
            [k, i.default_value]
            for k, i in enumerate(bsdf.inputs)
            if isinstance(getattr(i, "default_value", None), (float, int)) and not isinstance(i.default_value, bool)
        ]
        return m

    def _set_bsdf(self, mat, rgb255, values):
        bsdf = mat.node_tree.nodes["Principled BSDF"]
        for k, v in mat["defaults"]:
            bsdf.inputs[int(k)].default_value = v
        bsdf.inputs["Base Color"].default_value = (*srgb_to_linear(rgb255), 1.0)
        for name, v in values.items():
            if name not in bsdf.inputs:
                raise KeyError(f"Principled BSDF has no input {name!r} (material values {values})")
            bsdf.inputs[name].default_value = v

    def _object(self, oid):
        ob = self.objects.get(oid)
        if ob is None:
            ob = self._link(self.bpy.data.objects.new(f"obj{oid}", self.meshes["cube"]))
            ob.pass_index = oid  # instance id in the Object Index pass, stable between A and B
            ob.material_slots[0].link = "OBJECT"  # material per object, not per shared mesh
            ob.material_slots[0].material = self._material(f"mat{oid}")
            self.objects[oid] = ob
        return ob

    def sync(self, spec, render):
        from mathutils import Vector

        bpy, scn = self.bpy, self.scn
        cam = scn.camera
        cs = spec["camera"]
        cam.location = cs["location"]
        cam.rotation_euler = (Vector(cs["look_at"]) - Vector(cs["location"])).to_track_quat("-Z", "Y").to_euler()
        cam.data.lens = cs["lens_mm"]
        cam.data.sensor_width = cs["sensor_width_mm"]
        cam.data.sensor_fit = "AUTO"

        for ls in spec["lights"]:
            lo = self.lights.get(ls["name"])
            if lo is None:
                lo = self._link(bpy.data.objects.new(ls["name"], bpy.data.lights.new(ls["name"], ls["type"])))
                self.lights[ls["name"]] = lo
            lo.data.type = ls["type"]
            lo.data.energy = ls["energy"]
            if ls["type"] == "AREA":
                lo.data.size = ls["size"]
            lo.location = ls["location"]
            lo.rotation_euler = (-Vector(ls["location"])).to_track_quat("-Z", "Y").to_euler()  # aim at the origin

        bg = scn.world.node_tree.nodes["Background"]
        bg.inputs["Color"].default_value = (*srgb_to_linear(spec["world_rgb"]), 1.0)
        self._set_bsdf(self.ground_mat, spec["ground"]["rgb"], spec["ground"]["bsdf"])

        present = set()
        for o in spec["objects"]:
            ob = self._object(o["id"])
            present.add(o["id"])
            if ob.data is not self.meshes[o["primitive"]]:
                ob.data = self.meshes[o["primitive"]]
            ob.location = o["location"]
            ob.scale = o["scale"]
            ob.rotation_euler = (0.0, 0.0, math.radians(o["rotation_deg"]))
            ob.hide_render = False
            self._set_bsdf(ob.material_slots[0].material, o["rgb"], o["bsdf"])
        for oid, ob in self.objects.items():
            if oid not in present:
                ob.hide_render = True  # removal: cheaper than deleting, the id stays known

        r, c = scn.render, scn.cycles
        r.resolution_x, r.resolution_y = render["width"], render["height"]
        r.threads = render["threads"]
        c.samples = render["samples"]
        c.seed = render["seed"]  # same seed for A and B: identical noise where nothing changed
        c.max_bounces = render["max_bounces"]
        c.diffuse_bounces = render["diffuse_bounces"]
        c.glossy_bounces = render["glossy_bounces"]
        c.transmission_bounces = render["max_bounces"]
        c.transparent_max_bounces = render["max_bounces"]
        c.use_light_tree = render["light_tree"]
        c.blur_glossy = render.get("blur_glossy", 0.0)  # less firefly speckle on metals at low spp
        c.sample_clamp_direct = render.get("clamp_direct", 0.0)
        c.sample_clamp_indirect = render.get("clamp_indirect", 10.0)
        c.use_denoising = render["denoise"]
        if render["denoise"]:
            c.denoiser = "OPENIMAGEDENOISE"
            c.denoising_prefilter = render["denoising_prefilter"]
            c.denoising_quality = render["denoising_quality"]
            c.denoising_input_passes = render.get("denoising_input_passes", "RGB_ALBEDO_NORMAL")
        bpy.context.view_layer.update()

    def out_of_frame(self, spec, margin_px):
        """Ids of objects whose projected mesh leaves the frame (occlusion does not matter here)."""
        return self.project(spec, margin_px)[0]

    def project(self, spec, margin_px):
        """(ids of objects whose projected mesh leaves the frame, {id: unoccluded silhouette area in px})."""
        from bpy_extras.object_utils import world_to_camera_view
        from mathutils import Vector

        scn = self.scn
        w, h = scn.render.resolution_x, scn.render.resolution_y
        bad, silhouettes = [], {}
        for o in spec["objects"]:
            ob = self.objects[o["id"]]
            mw = np.array(ob.matrix_world)
            me = ob.data
            co = np.empty(len(me.vertices) * 3, dtype=np.float64)
            me.vertices.foreach_get("co", co)
            pts = co.reshape(-1, 3) @ mw[:3, :3].T + mw[:3, 3]
            # The silhouette's extreme points are vertices of the convex hull: test all (<= 500 per mesh).
            # Every primitive is convex, so the hull of the projected vertices is its unoccluded silhouette.
            xy = []
            for p in pts:
                v = world_to_camera_view(scn, scn.camera, Vector(p))
                x, y = v.x * w, (1.0 - v.y) * h
                xy.append((x, y))
                if v.z <= 0 or x < margin_px or y < margin_px or x > w - margin_px or y > h - margin_px:
                    bad.append(o["id"])
                    break
            else:
                silhouettes[o["id"]] = hull_area(np.array(xy))
        return bad, silhouettes

    def render(self, png_path):
        """Render the synced scene; write the beauty PNG; return (ids HxW int32, rgb HxWx3 uint8)."""
        from PIL import Image

        bpy, r = self.bpy, self.scn.render
        ids = self.render_ids()
        r.image_settings.media_type = "IMAGE"
        r.image_settings.file_format = "PNG"
        r.image_settings.color_mode = "RGB"
        r.image_settings.color_depth = "8"
        r.image_settings.compression = 15
        bpy.data.images["Render Result"].save_render(png_path, scene=self.scn)
        with Image.open(png_path) as im:
            rgb = np.asarray(im.convert("RGB"))
        return ids, rgb

    def render_ids(self):
        """Render the synced scene to a multilayer EXR; return the Object Index pass (HxW int32)."""
        import OpenEXR

        r = self.scn.render
        r.image_settings.media_type = "MULTI_LAYER_IMAGE"
        r.image_settings.color_depth = "16"  # half float holds integer ids exactly
        r.filepath = self.exr_path
        self.bpy.ops.render.render(write_still=True)
        with OpenEXR.File(self.exr_path, separate_channels=True) as f:
            ch = {k: v for part in f.parts for k, v in part.channels.items()}
        key = next((k for k in ch if k.endswith("Object Index.X") or k.endswith("IndexOB.X")), None)
        if key is None:
            raise RuntimeError(f"no Object Index channel in the EXR; channels: {sorted(ch)}")
        return np.rint(ch[key].pixels).astype(np.int32)  # row 0 = top, like image coordinates


GPU_BACKENDS = ("OPTIX", "CUDA", "HIP")  # preference order of --device auto
DEVICES = ("cpu", "cuda", "optix", "hip", "auto")


def gpu_devices() -> dict[str, list[str]]:
    """{backend: [device names]} of the GPU backends Cycles can use on this machine."""
    import bpy

    prefs = bpy.context.preferences.addons["cycles"].preferences
    found = {}
    for backend in GPU_BACKENDS:
        try:
            names = [d.name for d in prefs.get_devices_for_type(backend) if d.type == backend]
        except (TypeError, ValueError, RuntimeError):  # backend not compiled in / driver library missing
            names = []
        if names:
            found[backend] = names
    return found


def select_device(scene: BlenderScene, requested: str) -> dict:
    """Point Cycles at the requested device; a device that is not present raises ValueError naming it."""
    if requested not in DEVICES:
        raise ValueError(f"--device: expected one of {', '.join(DEVICES)}, got {requested!r}")
    backend = requested.upper()
    found = {} if backend == "CPU" else gpu_devices()
    if backend == "AUTO":
        backend = next((b for b in GPU_BACKENDS if b in found), "CPU")
    if backend == "CPU":
        scene.scn.cycles.device = "CPU"
        return {"device": "CPU", "names": [], "requested": requested}
    if backend not in found:
        seen = ", ".join(f"{b}: {', '.join(n)}" for b, n in found.items()) or "none"
        raise ValueError(
            f"--device {requested}: Cycles finds no {backend} device on this machine (GPU devices found: {seen}). "
            "Check the driver (nvidia-smi / rocminfo) or use --device cpu or auto."
        )
    prefs = scene.bpy.context.preferences.addons["cycles"].preferences
    prefs.compute_device_type = backend
    for d in prefs.get_devices_for_type(backend):
        d.use = d.type == backend  # every GPU of that backend, not the CPU next to it
    scene.scn.cycles.device = "GPU"
    return {"device": backend, "names": found[backend], "requested": requested}


def renderer_info(device: str = "CPU"):
    import bpy

    return {"name": "blender-cycles", "version": bpy.app.version_string, "device": device}


def handle(scene: BlenderScene, job: dict) -> dict:
    t0, c0 = time.perf_counter(), time.process_time()
    render, gates = job["render"], job["gates"]
    timing = {}
    silhouettes = {}
    for side in ("scene_a", "scene_b"):
        scene.sync(job[side], render)
        bad, silhouettes[side[-1]] = scene.project(job[side], gates["frame_margin_px"])
        if bad:
            return {
                "accepted": False,
                "reason": "out_of_frame",
                "detail": f"{side}: objects {bad} leave the frame",
                "differences": [],
                "timing": {"total_s": time.perf_counter() - t0},
            }
    timing["check_s"] = time.perf_counter() - t0
    diff_ids = {d["object_id"] for d in job["differences"]}
    ids_a = {o["id"] for o in job["scene_a"]["objects"]}
    ids_b = {o["id"] for o in job["scene_b"]["objects"]}
    untouched = sorted((ids_a & ids_b) - diff_ids)
    if render.get("mask_prepass") and not job.get("only_a"):
        # Cheap 1-spp, no-bounce renders give the masks: the visibility gates reject most bad candidates
        # before the expensive renders. The GT itself always comes from the final renders' masks.
        pre = dict(render, samples=1, denoise=False, max_bounces=0, diffuse_bounces=0, glossy_bounces=0)
        scene.sync(job["scene_a"], pre)
        pre_a = scene.render_ids()
        scene.sync(job["scene_b"], pre)
        pre_b = scene.render_ids()
        res = evaluate_pair(pre_a, pre_b, None, None, job["differences"], untouched, gates)
        timing["prepass_s"] = time.perf_counter() - t0 - timing["check_s"]
        if not res["accepted"]:
            timing.update(total_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0)
            return {
                "accepted": False,
                "reason": res["reason"],
                "detail": "mask pre-pass: " + res["detail"],
                "differences": res["differences"],
                "timing": timing,
            }
    scene.sync(job["scene_a"], render)
    t1 = time.perf_counter()
    mask_a, img_a = scene.render(job["out_a"])
    t2 = time.perf_counter()
    if job.get("only_a"):  # benchmarks: cost of one image
        return {
            "accepted": None,
            "reason": None,
            "differences": [],
            "timing": {"render_a_s": t2 - t1, "cpu_s": time.process_time() - c0},
        }
    scene.sync(job["scene_b"], render)
    mask_b, img_b = scene.render(job["out_b"])
    t3 = time.perf_counter()
    res = evaluate_pair(mask_a, mask_b, img_a, img_b, job["differences"], untouched, gates, silhouettes)
    if job.get("save_masks"):
        np.save(job["save_masks"] + "_mask_a.npy", mask_a)
        np.save(job["save_masks"] + "_mask_b.npy", mask_b)
    res["objects_a"] = {str(k): v for k, v in res["objects_a"].items()}
    res["objects_b"] = {str(k): v for k, v in res["objects_b"].items()}
    timing.update(
        render_a_s=t2 - t1, render_b_s=t3 - t2, total_s=time.perf_counter() - t0, cpu_s=time.process_time() - c0
    )
    res["timing"] = timing
    return res


def _die_with_parent():
    """SIGKILL this worker when the process that started it dies (Linux), so no orphan keeps writing files."""
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    expected = os.environ.get("DIG_RENDER_PARENT_PID")
    if expected and os.getppid() != int(expected):  # the parent died before prctl took effect
        os._exit(1)


def main():
    _die_with_parent()
    proto = os.fdopen(os.dup(1), "w", buffering=1)  # private channel for answers
    os.dup2(2, 1)  # Blender's C-level prints on fd 1 go to stderr and cannot corrupt the protocol
    sys.stdout = sys.stderr
    scene = None
    info = None
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        job_id = cmd = None
        try:
            job = json.loads(line)
            job_id = job.get("id")
            cmd = job.get("cmd", "render")
            if cmd == "quit":
                break
            if scene is None:
                scene = BlenderScene()
                info = renderer_info()
            if cmd == "info":
                ans = {"renderer": info}
            elif cmd == "device":
                chosen = select_device(scene, job["device"])
                info = renderer_info(chosen["device"])
                ans = {"device": chosen, "renderer": info}
            elif cmd == "render":
                ans = handle(scene, job)
                ans["renderer"] = info
            else:
                raise ValueError(f"unknown cmd {cmd!r}")
            ans.update(id=job_id, ok=True, peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
        except ValueError as exc:
            if cmd == "device":  # a missing device is bad input: the message is enough
                ans = {"id": job_id, "ok": False, "error": str(exc), "bad_input": True}
            else:
                ans = {"id": job_id, "ok": False, "error": traceback.format_exc()}
        except Exception:
            ans = {"id": job_id, "ok": False, "error": traceback.format_exc()}
        proto.write(json.dumps(ans) + "\n")
        proto.flush()


if __name__ == "__main__":
    main()
