"""Ground truth and pixel gates of a rendered pair, from its instance masks and images (numpy only).

The render worker (``data_prep/render/worker.py``, Blender) calls ``evaluate_pair`` on every candidate; the audit
(``data_prep.audit``) and the tests import the same functions in the main venv, without bpy.
"""

from __future__ import annotations

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
