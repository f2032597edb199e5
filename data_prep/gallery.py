"""Contact sheet of a generation run: ``python -m data_prep.gallery --pairs DIR --out sheet.png [--limit N]``.

One row per pair: image A | image B, each with the GT boxes drawn and labelled with the change type
(removal is drawn on A, where the object is; the other boxes on both). ``draw_pair`` is reusable, e.g. by
eval to overlay predictions (pass them as extra boxes with their own colour).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from data_prep.manifest import read_manifest
from dig_common.argtypes import positive_int
from dig_common.cli import CliError, cli_main, tool_parser
from dig_common.drawing import draw_box, save_png

PROG = "python -m data_prep.gallery"
SHEET_LIMIT = 24  # pairs on a contact sheet unless --limit says otherwise

TYPE_COLORS = {
    "size": (255, 140, 0),
    "shape": (255, 0, 255),
    "material": (0, 200, 255),
    "color": (255, 255, 0),
    "removal": (255, 40, 40),
    "addition": (40, 255, 40),
    "move": (0, 120, 255),  # opt-in change type (vocabulary weight 0 by default)
    "replacement": (160, 80, 255),  # photo pairs only
}
DEFAULT_COLOR = (255, 255, 255)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def draw_boxes(img: Image.Image, boxes: Sequence[dict], scale: float = 1.0, width: int = 2) -> Image.Image:
    """Draw boxes on a copy of img. Each box: {"box": [x0, y0, x1, y1] (pixels, x1/y1 exclusive),
    "label": str, optional "color": (r, g, b)}."""
    out = img.convert("RGB")
    if scale != 1.0:
        out = out.resize((round(out.width * scale), round(out.height * scale)), Image.NEAREST)
    draw = ImageDraw.Draw(out)
    font = _font(11)
    for b in boxes:
        color = tuple(b.get("color") or TYPE_COLORS.get(b.get("label", ""), DEFAULT_COLOR))
        x0, y0, _, y1 = draw_box(draw, b["box"], color, width, scale)
        label = b.get("label")
        if label:
            tx, ty = x0 + 1, (y0 - 13 if y0 >= 13 else y1 + 1)  # above the box, or below it at the top edge
            bbox = draw.textbbox((tx, ty), label, font=font)
            draw.rectangle(bbox, fill=(0, 0, 0))
            draw.text((tx, ty), label, fill=color, font=font)
    return out


def draw_pair(
    img_a: Image.Image,
    img_b: Image.Image,
    boxes_a: Sequence[dict],
    boxes_b: Sequence[dict] | None = None,
    title: str = "",
    scale: float = 1.0,
    gap: int = 6,
) -> Image.Image:
    """A | B side by side with boxes (see draw_boxes) and an optional title bar. boxes_b defaults to boxes_a."""
    a = draw_boxes(img_a, boxes_a, scale)
    b = draw_boxes(img_b, boxes_a if boxes_b is None else boxes_b, scale)
    title_h = 16 if title else 0
    sheet = Image.new("RGB", (a.width + gap + b.width, max(a.height, b.height) + title_h), (30, 30, 30))
    sheet.paste(a, (0, title_h))
    sheet.paste(b, (a.width + gap, title_h))
    if title:
        ImageDraw.Draw(sheet).text((4, 2), title, fill=(230, 230, 230), font=_font(12))
    return sheet


def pair_boxes(record: dict) -> tuple[list[dict], list[dict]]:
    """GT boxes of a pair record for image A and image B (removals on A only, additions on B only)."""
    on_a, on_b = [], []
    for d in record["differences"]:
        item = {"box": d["box"], "label": d["type"]}
        if d["type"] != "addition":
            on_a.append(item)
        if d["type"] != "removal":
            on_b.append(item)
    return on_a, on_b


def load_records(pairs_dir: Path, limit: int | None = None) -> list[tuple[Path, dict]]:
    """Pair records of a run, in manifest order (or all *.json pair files if there is no manifest)."""
    manifest = read_manifest(pairs_dir, required=False)
    if manifest.entries:
        paths = sorted(manifest.record_path(e) for e in manifest.entries)
    else:
        paths = sorted(p for p in Path(pairs_dir).rglob("*.json") if p.name not in ("stats.json", "config.json"))
    out = []
    for p in paths[:limit] if limit else paths:
        try:
            out.append((p, json.loads(p.read_text())))
        except json.JSONDecodeError as err:
            raise ValueError(f"pair record {p}: not valid JSON ({err}): regenerate the pair or remove it") from err
    return out


def image_paths(record_path: Path, rec: dict) -> tuple[Path, Path]:
    """Image A and image B of a pair record (the record's ``images``, or the generator's default names)."""
    imgs = rec.get("images", {"a": f"{rec['pair_id']}_a.png", "b": f"{rec['pair_id']}_b.png"})
    return record_path.parent / imgs["a"], record_path.parent / imgs["b"]


def make_sheet(pairs_dir: Path, limit: int | None = SHEET_LIMIT, columns: int = 2, scale: float = 1.0) -> Image.Image:
    tiles = []
    for path, rec in load_records(pairs_dir, limit):
        png_a, png_b = image_paths(path, rec)
        with Image.open(png_a) as ia, Image.open(png_b) as ib:
            on_a, on_b = pair_boxes(rec)
            types = ", ".join(d["type"] for d in rec["differences"]) or "no difference"
            tiles.append(
                draw_pair(
                    ia, ib, on_a, on_b, title=f"{rec['pair_id']}  K={rec['num_differences']}: {types}", scale=scale
                )
            )
    if not tiles:
        raise CliError(f"--pairs {pairs_dir}: no pair records found (give the output folder of a generation run)")
    tw, th = max(t.width for t in tiles), max(t.height for t in tiles)
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * (tw + 8), rows * (th + 8)), (0, 0, 0))
    for i, t in enumerate(tiles):
        sheet.paste(t, ((i % columns) * (tw + 8), (i // columns) * (th + 8)))
    return sheet


GALLERY_NAME = "gallery.png"  # the contact sheet's default file, in the pair set's folder


def check_cli_paths(pairs_dir: Path, outputs: dict[str, Path | None]) -> None:
    """--pairs is a folder and no output file (flag -> path) is a folder; data_prep.audit shares this."""
    if not pairs_dir.is_dir():
        raise CliError(f"--pairs {pairs_dir}: no such folder (give the output folder of a generation run)")
    for flag, out in outputs.items():
        if out is not None and out.is_dir():
            raise CliError(f"{flag} {out} is a folder: give the file to write")


@cli_main(PROG)
def main(argv: list[str] | None = None) -> int:
    p = tool_parser(PROG, __doc__)
    p.add_argument("--pairs", type=Path, required=True, help="output directory of a generation run")
    p.add_argument("--out", type=Path, default=None, help=f"PNG file to write (default: <pairs>/{GALLERY_NAME})")
    p.add_argument("--limit", type=positive_int, default=SHEET_LIMIT, help=f"at most this many pairs ({SHEET_LIMIT})")
    p.add_argument("--columns", type=positive_int, default=2)
    p.add_argument("--scale", type=float, default=1.0, help="image scale (e.g. 4 for 64x64 test pairs)")
    args = p.parse_args(argv)
    args.out = args.out or args.pairs / GALLERY_NAME  # next to the pairs it shows, not in the working directory
    check_cli_paths(args.pairs, {"--out": args.out})
    sheet = make_sheet(args.pairs, args.limit, args.columns, args.scale)
    save_png(sheet, args.out)
    print(f"wrote {args.out} ({sheet.width}x{sheet.height})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
