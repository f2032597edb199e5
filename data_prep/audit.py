"""Fidelity audit of a generated pair folder: ``python -m data_prep.audit --pairs DIR [--gallery sheet.png]``.

Prints one JSON object (and writes it with ``--out``): how many GT boxes really changed, which pairs carry a
visible change that no box accounts for (and where), whether K agrees between the plan, the record and the
manifest, counts per change type, image statistics and the difficulty fields of the differences. Exits 1 (and
says what on stderr) when it flags a box, a pair or a K. Run it on a sample before spending GPU hours on
training. ``--gallery`` draws the flagged pairs: A | B with the GT boxes | a heat map of the change with the
unlabeled blobs boxed in white (at most ``--gallery-limit`` rows).

The rules (defaults, flags to change them):
- a GT box is *visibly changed* when >= 20 pixels inside it change by more than 12/255 in their largest channel;
- a pair has an *unlabeled change* when an 8-connected blob of pixels whose largest channel changes by more
  than 24/255, of at least 0.1 % of the image, touches no GT box grown by 8 px (``ground_truth.unlabeled_blobs``,
  the same function the generator's ``unlabeled_change`` gate uses).
"""

from __future__ import annotations

import collections
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data_prep.gallery import _font, check_cli_paths, draw_boxes, image_paths, load_records, pair_boxes
from data_prep.manifest import read_manifest
from data_prep.render.ground_truth import unlabeled_blobs
from dig_common.argtypes import positive_int
from dig_common.cli import cli_main, tool_parser
from dig_common.drawing import save_png
from dig_common.fileio import atomic_write_text

PROG = "python -m data_prep.audit"
GALLERY_LIMIT = 50  # rows in the gallery of flagged pairs unless --gallery-limit says otherwise


@dataclass(frozen=True)
class AuditRule:
    box_intensity: int = 12  # a box pixel counts as changed above this (8-bit, largest channel)
    box_min_px: int = 20  # ... and a box is visibly changed with at least this many such pixels
    blob_intensity: int = 24
    blob_fraction: float = 0.001  # of the image area
    dilate_px: int = 8

    def blob_min_px(self, width: int, height: int) -> int:
        return max(1, math.ceil(self.blob_fraction * width * height))


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def audit_pair(rec: dict, img_a: np.ndarray, img_b: np.ndarray, rule: AuditRule) -> dict:
    """Fidelity figures of one pair record and its two images."""
    h, w = img_a.shape[:2]
    delta = np.abs(img_a.astype(np.int16) - img_b.astype(np.int16)).max(axis=-1)
    changed = delta > rule.box_intensity
    boxes = []
    for d in rec["differences"]:
        x0, y0, x1, y1 = d["box"]
        px = int(changed[y0:y1, x0:x1].sum())
        boxes.append(
            {
                "type": d["type"],
                "object_id": d["object_id"],
                "box": d["box"],
                "changed_px": px,
                "visibly_changed": px >= rule.box_min_px,
            }
        )
    gt_boxes = [d["box"] for d in rec["differences"]]
    blobs = unlabeled_blobs(img_a, img_b, gt_boxes, rule.blob_intensity, rule.blob_min_px(w, h), rule.dilate_px)
    planned = rec.get("generator", {}).get("k")
    counts = {len(rec["differences"]), rec.get("num_differences"), len(rec.get("edits", rec["differences"]))}
    if planned is not None:
        counts.add(planned)
    return {
        "pair_id": rec["pair_id"],
        "size": [w, h],
        "boxes": boxes,
        "difficulty": [d.get("difficulty") or {} for d in rec["differences"]],
        "num_objects_a": rec.get("num_objects_a", len(rec.get("scene", {}).get("objects", [])) or None),
        "unlabeled_blobs": blobs,
        "k_agrees": len(counts) == 1,
        "k": len(rec["differences"]),
        "changed_fraction": float((delta > rule.blob_intensity).mean()),
        "mean_rgb_a": img_a.reshape(-1, 3).mean(axis=0).tolist(),
        "luma_std_a": float(img_a.astype(np.float32).mean(axis=-1).std()),
    }


def _median(values):
    return round(float(np.median(values)), 4) if values else None


DIFFICULTY_SUMMARY = ("visible_px", "occluded_fraction", "delta_e00", "size_ratio", "box_fraction", "border_px")


def difficulty_summary(results: list[dict]) -> dict:
    """Min / median / max of each recorded difficulty field over the differences that have it."""
    out = {}
    for name in DIFFICULTY_SUMMARY:
        values = [d[name] for r in results for d in r["difficulty"] if d.get(name) is not None]
        if values:
            low, high = round(float(min(values)), 4), round(float(max(values)), 4)
            out[name] = {"n": len(values), "min": low, "median": _median(values), "max": high}
    objects = [r["num_objects_a"] for r in results if r["num_objects_a"]]
    if objects:
        out["num_objects_a"] = dict(sorted(collections.Counter(objects).items()))
    return out


def summarize(pairs_dir: Path, results: list[dict], manifest_mismatch: list[str], rule: AuditRule) -> dict:
    boxes = [b | {"pair_id": r["pair_id"]} for r in results for b in r["boxes"]]
    flagged = [{"pair_id": r["pair_id"], "blobs": r["unlabeled_blobs"]} for r in results if r["unlabeled_blobs"]]
    unchanged = [b for b in boxes if not b["visibly_changed"]]
    k_bad = sorted({r["pair_id"] for r in results if not r["k_agrees"]} | set(manifest_mismatch))
    n = len(results)
    return {
        "pairs_dir": str(pairs_dir),
        "pairs": n,
        "rule": asdict(rule),
        "boxes": {
            "total": len(boxes),
            "visibly_changed": len(boxes) - len(unchanged),
            "fraction_visibly_changed": round((len(boxes) - len(unchanged)) / len(boxes), 4) if boxes else None,
            "median_changed_px": _median([b["changed_px"] for b in boxes]),
            "not_visibly_changed": unchanged,
        },
        "unlabeled_change": {
            "pairs_flagged": len(flagged),
            "fraction_of_pairs": round(len(flagged) / n, 4) if n else None,
            "flagged": flagged,
        },
        "k_agreement": {
            "pairs_agree": n - len(k_bad),
            "disagree": k_bad,
            "k_histogram": dict(sorted(collections.Counter(r["k"] for r in results).items())),
        },
        "types": dict(collections.Counter(b["type"] for b in boxes).most_common()),
        "difficulty": difficulty_summary(results),
        "images": {
            "sizes": dict(collections.Counter(f"{r['size'][0]}x{r['size'][1]}" for r in results)),
            "mean_rgb_a": [round(float(v), 2) for v in np.mean([r["mean_rgb_a"] for r in results], axis=0)]
            if results
            else None,
            "median_luma_std_a": _median([r["luma_std_a"] for r in results]),
            "median_changed_fraction": _median([r["changed_fraction"] for r in results]),
            "pairs_without_any_change": sum(r["changed_fraction"] == 0 for r in results),
        },
    }


def findings(report: dict) -> dict[str, int]:
    """What the audit flags, counted: the CLI exits 1 when any count is not 0."""
    boxes = report["boxes"]
    return {
        "pairs with an unlabeled change": report["unlabeled_change"]["pairs_flagged"],
        "boxes not visibly changed": boxes["total"] - boxes["visibly_changed"],
        "pairs whose K disagrees": len(report["k_agreement"]["disagree"]),
    }


def heat_map(img_a: np.ndarray, img_b: np.ndarray) -> Image.Image:
    """Largest-channel |A - B| as a black-red-yellow-white map; 64/255 and more is white."""
    d = np.abs(img_a.astype(np.int16) - img_b.astype(np.int16)).max(axis=-1).astype(np.float32)
    v = np.clip(d * (3 * 255 / 64), 0, 3 * 255)
    rgb = np.stack([np.clip(v, 0, 255), np.clip(v - 255, 0, 255), np.clip(v - 510, 0, 255)], axis=-1)
    return Image.fromarray(rgb.astype(np.uint8))


def draw_flagged(path: Path, rec: dict, result: dict, scale: float = 1.0) -> Image.Image:
    """One row: A | B with GT boxes | heat map with the GT boxes (grey) and unlabeled blobs (white)."""
    png_a, png_b = image_paths(path, rec)
    img_a, img_b = _rgb(png_a), _rgb(png_b)
    on_a, on_b = pair_boxes(rec)
    heat_boxes = [{"box": d["box"], "color": (150, 150, 150)} for d in rec["differences"]]
    heat_boxes += [
        {"box": b["box"], "label": f"unlabeled {b['px']} px", "color": (255, 255, 255)}
        for b in result["unlabeled_blobs"]
    ]
    tiles = [
        draw_boxes(Image.fromarray(img_a), on_a, scale),
        draw_boxes(Image.fromarray(img_b), on_b, scale),
        draw_boxes(heat_map(img_a, img_b), heat_boxes, scale),
    ]
    unchanged = [b["type"] for b in result["boxes"] if not b["visibly_changed"]]
    title = f"{rec['pair_id']}  K={len(rec['differences'])}: {', '.join(d['type'] for d in rec['differences'])}"
    if unchanged:
        title += f"  | not visibly changed: {', '.join(unchanged)}"
    gap, title_h = 6, 16
    row = Image.new("RGB", (sum(t.width for t in tiles) + gap * 2, tiles[0].height + title_h), (30, 30, 30))
    for i, t in enumerate(tiles):
        row.paste(t, (i * (t.width + gap), title_h))
    ImageDraw.Draw(row).text((4, 2), title, fill=(230, 230, 230), font=_font(12))
    return row


def audit(
    pairs_dir: Path,
    rule: AuditRule = AuditRule(),
    gallery: Path | None = None,
    scale: float = 1.0,
    gallery_limit: int = GALLERY_LIMIT,
) -> dict:
    """Audit every pair of a generator output folder; optionally draw the flagged ones into `gallery`."""
    pairs_dir = Path(pairs_dir)
    records = load_records(pairs_dir)
    if not records:
        raise ValueError(f"--pairs {pairs_dir}: no pair records found (give the output folder of a generation run)")
    by_id = {rec["pair_id"]: rec for _, rec in records}
    manifest_mismatch = []
    for entry in read_manifest(pairs_dir, required=False).entries:
        rec = by_id.get(entry.pair_id)
        # K and types the manifest did not record (None) are not checked; a record the manifest lists must exist
        if (
            rec is None
            or entry.num_differences not in (None, len(rec["differences"]))
            or (entry.types is not None and list(entry.types) != [d["type"] for d in rec["differences"]])
        ):
            manifest_mismatch.append(entry.pair_id)
    results, rows = [], []
    for path, rec in records:
        png_a, png_b = image_paths(path, rec)
        res = audit_pair(rec, _rgb(png_a), _rgb(png_b), rule)
        results.append(res)
        bad = res["unlabeled_blobs"] or not all(b["visibly_changed"] for b in res["boxes"])
        if gallery is not None and bad and len(rows) < gallery_limit:
            rows.append(draw_flagged(path, rec, res, scale))
    report = summarize(pairs_dir, results, manifest_mismatch, rule)
    if gallery is not None:
        gallery = Path(gallery)
        if rows:
            sheet = Image.new("RGB", (max(r.width for r in rows), sum(r.height + 8 for r in rows)), (0, 0, 0))
            y = 0
            for r in rows:
                sheet.paste(r, (0, y))
                y += r.height + 8
        else:
            sheet = Image.new("RGB", (360, 24), (30, 30, 30))
            ImageDraw.Draw(sheet).text((4, 5), "no flagged pairs", fill=(230, 230, 230), font=_font(12))
        save_png(sheet, gallery)
        report["gallery"] = {"path": str(gallery), "pairs_drawn": len(rows)}
    return report


FLAGGED_NAME = Path("audit_flagged.png")  # --gallery without a path: this file in the pair set's folder


@cli_main(PROG)
def main(argv: list[str] | None = None) -> int:
    p = tool_parser(PROG, __doc__)
    p.add_argument("--pairs", type=Path, required=True, help="output directory of a generation run")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    p.add_argument(
        "--gallery",
        type=Path,
        nargs="?",
        const=FLAGGED_NAME,
        default=None,
        help=f"PNG of the flagged pairs (A | B | change heat map); without a path: <pairs>/{FLAGGED_NAME}",
    )
    p.add_argument("--gallery-limit", type=positive_int, default=GALLERY_LIMIT, help="at most this many gallery rows")
    p.add_argument("--scale", type=float, default=1.0, help="gallery image scale (e.g. 4 for 64x64 test pairs)")
    d = AuditRule()
    p.add_argument("--box-intensity", type=int, default=d.box_intensity)
    p.add_argument("--box-min-px", type=int, default=d.box_min_px)
    p.add_argument("--blob-intensity", type=int, default=d.blob_intensity)
    p.add_argument("--blob-fraction", type=float, default=d.blob_fraction)
    p.add_argument("--dilate-px", type=int, default=d.dilate_px)
    p.add_argument("--brief", action="store_true", help="print counts only (no per-box / per-pair lists)")
    args = p.parse_args(argv)
    if args.gallery == FLAGGED_NAME:  # --gallery alone: next to the pairs, not in the working directory
        args.gallery = args.pairs / FLAGGED_NAME
    check_cli_paths(args.pairs, {"--out": args.out, "--gallery": args.gallery})
    rule = AuditRule(args.box_intensity, args.box_min_px, args.blob_intensity, args.blob_fraction, args.dilate_px)
    report = audit(args.pairs, rule, args.gallery, args.scale, args.gallery_limit)
    if args.out:
        atomic_write_text(args.out, json.dumps(report, indent=1))
    shown = report
    if args.brief:
        shown = json.loads(json.dumps(report))
        shown["boxes"].pop("not_visibly_changed")
        shown["unlabeled_change"]["flagged"] = [f["pair_id"] for f in shown["unlabeled_change"]["flagged"]]
    json.dump(shown, sys.stdout, indent=1)
    print()
    found = {name: count for name, count in findings(report).items() if count}
    if found:  # docs/cli.md: exit 1 = the tool ran and its check failed
        listed = ", ".join(f"{name}: {count}" for name, count in found.items())
        print(f"{PROG}: {args.pairs}: {listed} (of {report['pairs']} pairs)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
