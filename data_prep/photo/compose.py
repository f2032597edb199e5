"""Compositing of photo pairs: a background photo, pasted cut-outs with exact masks, recolours; visible masks.

A *photo scene* is a JSON-ready dict that fully determines one image from the COCO set:

    {"background": {"image_id", "x0", "y0", "scale"},            # output pixel (u, v) <- source (x0 + u/s, y0 + v/s)
     "recolor": [{"id", "ann_id", "hue_deg"}],                    # instances of the photo itself, hue-rotated
     "pastes": [{"id", "ann_id", "x", "y", "scale", "gain", "hue_deg"}]}   # bottom to top; (x, y): box corner

Pasted cut-outs are warped with one affine map (bilinear colour, mask thresholded at 0.5), feathered by a Gaussian
alpha edge and brightness-matched by a stored gain. Later pastes occlude earlier ones: the visible mask of a
paste is its mask minus every later paste's, that of a recoloured photo instance its mask minus every paste's.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image
from scipy import ndimage

from data_prep.photo.coco import CocoSet, Instance

# YIQ: hue rotation about the luma axis keeps brightness, so a colour edit changes colour only.
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=np.float32)
_YIQ_INV = np.linalg.inv(_YIQ).astype(np.float32)
_LUMA = _YIQ[0]


def hue_matrix(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=np.float32)
    return _YIQ_INV @ rot @ _YIQ


def rotate_hue(rgb: np.ndarray, deg: float) -> np.ndarray:
    return np.clip(rgb @ hue_matrix(deg).T, 0, 255)


def saturation(rgb: np.ndarray, mask: np.ndarray) -> float:
    """Mean HSV saturation of the masked pixels (0..1)."""
    px = rgb[mask].astype(np.float32)
    if not len(px):
        return 0.0
    hi, lo = px.max(axis=1), px.min(axis=1)
    return float(np.mean(np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-6), 0.0)))


def luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ _LUMA


def warp(src: np.ndarray, x0: float, y0: float, scale: float, ox: int, oy: int, w: int, h: int, mode) -> np.ndarray:
    """Patch (h, w) of the output frame at (ox, oy) sampled from ``src`` by output (u, v) <- (x0 + u/s, y0 + v/s)."""
    im = Image.fromarray(src)
    inv = 1.0 / scale
    # PIL maps output pixel centres (u + .5) to input coordinates with the affine (a, b, c, d, e, f).
    data = (inv, 0.0, x0 + (ox - 0.0) * inv, 0.0, inv, y0 + (oy - 0.0) * inv)
    return np.asarray(im.transform((w, h), Image.AFFINE, data=data, resample=mode, fillcolor=0))


class Layer:
    """One warped instance in output pixels: patch origin, colour, alpha, binary mask (full frame)."""

    def __init__(self, oy: int, ox: int, rgb: np.ndarray, alpha: np.ndarray, mask_full: np.ndarray):
        self.oy, self.ox, self.rgb, self.alpha, self.mask = oy, ox, rgb, alpha, mask_full

    def composite(self, canvas: np.ndarray) -> None:
        h, w = self.alpha.shape
        region = canvas[self.oy : self.oy + h, self.ox : self.ox + w]
        a = self.alpha[..., None]
        region *= 1.0 - a
        region += self.rgb * a


def instance_layer(
    coco: CocoSet, inst: Instance, x: float, y: float, scale: float, width: int, height: int, sigma: float
) -> Layer:
    """Warp ``inst`` so that its source box corner lands on output (x, y), scaled by ``scale``, clipped to the frame."""
    bx, by, bw, bh = inst.bbox
    pad = math.ceil(3 * sigma) + 1
    ox0, oy0 = max(0, math.floor(x) - pad), max(0, math.floor(y) - pad)
    ox1, oy1 = min(width, math.ceil(x + bw * scale) + pad), min(height, math.ceil(y + bh * scale) + pad)
    w, h = ox1 - ox0, oy1 - oy0
    src_x0, src_y0 = bx - x / scale, by - y / scale  # source coordinate of output (0, 0)
    rgb = warp(coco.image(inst.image_id), src_x0, src_y0, scale, ox0, oy0, w, h, Image.BILINEAR).astype(np.float32)
    mask8 = (coco.mask(inst).astype(np.uint8)) * 255
    mask = warp(mask8, src_x0, src_y0, scale, ox0, oy0, w, h, Image.BILINEAR) >= 128
    alpha = feather(mask, sigma)
    full = np.zeros((height, width), dtype=bool)
    full[oy0:oy1, ox0:ox1] = mask
    return Layer(oy0, ox0, rgb, alpha, full)


def feather(mask: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return mask.astype(np.float32)
    return ndimage.gaussian_filter(mask.astype(np.float32), sigma, mode="constant")


def background(coco: CocoSet, bg: dict, width: int, height: int) -> np.ndarray:
    src = coco.image(bg["image_id"])
    return warp(src, bg["x0"], bg["y0"], bg["scale"], 0, 0, width, height, Image.BILINEAR).astype(np.float32)


def native_mask(coco: CocoSet, inst: Instance, bg: dict, width: int, height: int) -> np.ndarray:
    mask8 = coco.mask(inst).astype(np.uint8) * 255
    return warp(mask8, bg["x0"], bg["y0"], bg["scale"], 0, 0, width, height, Image.BILINEAR) >= 128


class Compositor:
    """Renders photo scenes; warped layers are cached per (instance, placement), so A and B share the work."""

    def __init__(self, coco: CocoSet, width: int, height: int, sigma: float):
        self.coco, self.width, self.height, self.sigma = coco, width, height, sigma
        self._ann = {inst.ann_id: inst for inst in coco.instances}
        for natives in coco.natives.values():
            for inst in natives:
                self._ann.setdefault(inst.ann_id, inst)
        self._layers: dict[tuple, Layer] = {}
        self._backgrounds: dict[tuple, np.ndarray] = {}

    def reset(self) -> None:
        self._layers.clear()
        self._backgrounds.clear()

    def instance(self, ann_id: int) -> Instance:
        return self._ann[ann_id]

    def layer(self, paste: dict) -> Layer:
        key = (paste["ann_id"], paste["x"], paste["y"], paste["scale"])
        if key not in self._layers:
            inst = self._ann[paste["ann_id"]]
            self._layers[key] = instance_layer(
                self.coco, inst, paste["x"], paste["y"], paste["scale"], self.width, self.height, self.sigma
            )
        return self._layers[key]

    def background(self, bg: dict) -> np.ndarray:
        key = (bg["image_id"], bg["x0"], bg["y0"], bg["scale"])
        if key not in self._backgrounds:
            self._backgrounds[key] = background(self.coco, bg, self.width, self.height)
        return self._backgrounds[key]

    def native_mask(self, bg: dict, ann_id: int) -> np.ndarray:
        return native_mask(self.coco, self._ann[ann_id], bg, self.width, self.height)

    def render(self, scene: dict) -> tuple[np.ndarray, dict[int, np.ndarray], dict[int, np.ndarray]]:
        """(uint8 image, full masks by object id, visible masks by object id)."""
        canvas = self.background(scene["background"]).copy()
        full: dict[int, np.ndarray] = {}
        for rc in scene["recolor"]:
            mask = self.native_mask(scene["background"], rc["ann_id"])
            if rc["hue_deg"]:
                a = feather(mask, self.sigma)[..., None]
                canvas = canvas * (1 - a) + rotate_hue(canvas, rc["hue_deg"]) * a
            full[rc["id"]] = mask
        for paste in scene["pastes"]:
            layer = self.layer(paste)
            if paste.get("hue_deg") or paste.get("gain", 1.0) != 1.0:
                rgb = np.clip(layer.rgb * paste.get("gain", 1.0), 0, 255)
                if paste.get("hue_deg"):
                    rgb = rotate_hue(rgb, paste["hue_deg"])
                layer = Layer(layer.oy, layer.ox, rgb, layer.alpha, layer.mask)
            layer.composite(canvas)
            full[paste["id"]] = layer.mask
        visible: dict[int, np.ndarray] = {}
        covered = np.zeros((self.height, self.width), dtype=bool)
        for paste in reversed(scene["pastes"]):
            visible[paste["id"]] = full[paste["id"]] & ~covered
            covered |= full[paste["id"]]
        for rc in scene["recolor"]:
            visible[rc["id"]] = full[rc["id"]] & ~covered
        image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
        return image, full, visible


def mask_box(mask: np.ndarray) -> list[int] | None:
    """[x0, y0, x1, y1], x1/y1 exclusive, of a boolean mask (None if empty)."""
    ys, xs = np.nonzero(mask)
    if not len(xs):
        return None
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
