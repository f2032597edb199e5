"""Blender render worker for DiG pairs. Runs ONLY in the render venv (bpy 5.0.1, numpy<2, OpenEXR).

Long-lived: reads one JSON job per line on stdin and answers one JSON line on its original stdout, so the
~1 s start-up of bpy is paid once per worker. Blender's own prints go to stderr (stdout fd is redirected).

Commands: {"cmd": "device", "device": cpu|cuda|optix|hip|auto} (once, before rendering), {"cmd": "info"},
{"cmd": "quit"}; otherwise a render job:
Job: {"id", "scene_a", "scene_b", "differences": [{"type", "object_id"}], "render": {...}, "gates": {...},
      "out_a", "out_b", "save_masks": optional path prefix}
Answer: {"id", "ok": true, "accepted", "reason", "detail", "differences": [...], "objects_a", "objects_b",
         "timing", "renderer", "peak_rss_mb"} or {"id", "ok": false, "error"}.

Run as a script by path (``data_prep.render.generate`` starts it); the ground truth and gates it applies are
``ground_truth.py`` beside it (numpy only, also imported by the audit). bpy/OpenEXR are imported lazily.
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
from ground_truth import evaluate_pair, hull_area  # the sibling module: this file runs as a script

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
    # Ctrl-C reaches the whole process group: the parent decides (it keeps the finished pairs, then stops us)
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
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
