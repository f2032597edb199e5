"""Gallery of predictions vs ground truth on DiG pairs: a PNG contact sheet and a static HTML page.

    # from eval.dig's per-pair output
    python -m eval.visualize --samples runs/results.samples.jsonl --data test.parquet --out-dir runs/gallery
    # from the generations verl dumps during validation (trainer.validation_data_dir=DIR -> DIR/<step>.jsonl)
    python -m eval.visualize --verl-dump DIR/40.jsonl --data val.parquet --model MODEL --out-dir runs/g40

Each tile shows image A and image B side by side: ground-truth boxes in green on both, predicted boxes in
red on B (a matched prediction, IoU >= threshold, is drawn solid, an unmatched one dashed), with the pair
id, K, F1 and mIoU. verl's dump holds the prompt text, the response and the ground-truth string but no
images and no pair id: rows are re-scored here with the reward's code and joined to ``--data`` by their
ground-truth string (without ``--data`` the boxes are drawn on a blank canvas of the image size).
"""

from __future__ import annotations

import argparse
import html
import io
import json
import sys
from collections.abc import Collection
from pathlib import Path

from PIL import Image, ImageDraw

from dig_common.argtypes import positive_int
from dig_common.cli import cli_main, tool_parser
from dig_common.drawing import draw_box, save_png
from dig_common.fileio import atomic_write_text
from dig_common.models import load_model_spec
from dig_common.parquet import open_parquet
from eval.dig import check_data_model
from eval.options import add_model_arg, require_file
from eval.scoring import reward_knobs, score_response

PROG = "python -m eval.visualize"

GT_COLOR = (40, 200, 60)
PRED_COLOR = (230, 40, 40)
TILE_HEIGHT = 200  # pixels per image in a tile (images are scaled to it)
CAPTION_HEIGHT = 34
SORTS = ("order", "worst", "best")


# ----------------------------------------------------------------------------------------------- inputs


def load_images(
    data: str | Path | None, pair_ids: Collection[str] | None = None
) -> tuple[dict[str, tuple[bytes, bytes]], dict[str, str]]:
    """From a DiG parquet: ``{pair_id: (png A, png B)}`` and ``{ground_truth string: pair_id}``. ``pair_ids``:
    keep only these pairs' images (the join table is always whole; an empty collection reads no image)."""
    if data is None:
        return {}, {}
    images, by_gt = {}, {}
    parquet = open_parquet(data)
    columns = ["reward_model", "extra_info"] + ([] if pair_ids is not None and not pair_ids else ["images"])
    for batch in parquet.iter_batches(batch_size=64, columns=columns):
        for row in batch.to_pylist():
            pid = str(row["extra_info"]["pair_id"])
            if "images" in row and (pair_ids is None or pid in pair_ids):
                images[pid] = (row["images"][0]["bytes"], row["images"][1]["bytes"])
            by_gt.setdefault(row["reward_model"]["ground_truth"], pid)
    return images, by_gt


def read_jsonl(path: str | Path) -> list[dict]:
    out = []
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not a JSON line ({err})") from err
    return out


def samples_from_eval(path: str | Path) -> list[dict]:
    """eval.dig's ``*.samples.jsonl``: already scored."""
    out = read_jsonl(path)
    for number, s in enumerate(out, 1):
        missing = {"pair_id", "pred_boxes", "gt_boxes", "pairs", "metrics", "width", "height"} - set(s)
        if missing:
            raise ValueError(f"{path}:{number}: not an eval.dig samples line (missing {', '.join(sorted(missing))})")
    return out


def verl_ground_truth(row: dict) -> str:
    """The ground-truth string of a verl dump line (the parquet's ``reward_model.ground_truth``, the join key)."""
    return row["gts"] if isinstance(row["gts"], str) else json.dumps(row["gts"])


def sample_from_verl_row(row: dict, knobs: dict, pair_id: str) -> dict:
    """One verl dump line re-scored with the reward's code (boxes and matches recovered)."""
    gts = verl_ground_truth(row)
    scored = score_response(row["output"], gts, knobs)
    gt = json.loads(gts)
    return {
        "pair_id": pair_id,
        "num_gt": len(scored.gt_boxes),
        "types": gt.get("types"),
        "response": row["output"],
        "step": row.get("step"),
        "verl_score": row.get("score"),
        **scored.to_json(),
    }


def verl_rows(path: str | Path) -> list[dict]:
    """The lines of verl's validation dump (``{"input", "output", "gts", "score", "step", <reward keys>}``)."""
    rows = read_jsonl(path)
    for number, row in enumerate(rows, 1):
        if "output" not in row or "gts" not in row:
            raise ValueError(f"{path}:{number}: not a verl generations dump line (needs 'output' and 'gts')")
    return rows


def samples_from_verl_dump(path: str | Path, knobs: dict, by_gt: dict[str, str]) -> list[dict]:
    """verl's validation dump, re-scored with the reward's code to recover boxes and matches."""
    return [
        sample_from_verl_row(row, knobs, by_gt.get(verl_ground_truth(row), f"{Path(path).stem}#{number}"))
        for number, row in enumerate(verl_rows(path), 1)
    ]


def order_samples(samples: list[dict], sort: str, limit: int | None) -> list[dict]:
    if sort == "worst":
        samples = sorted(samples, key=lambda s: (s["metrics"]["score"], s["pair_id"]))
    elif sort == "best":
        samples = sorted(samples, key=lambda s: (-s["metrics"]["score"], s["pair_id"]))
    return samples[:limit] if limit else samples


# ----------------------------------------------------------------------------------------------- drawing


def _open(data: bytes | None, width: float, height: float) -> Image.Image:
    if data is None:
        return Image.new("RGB", (max(1, round(width)), max(1, round(height))), (90, 90, 90))
    return Image.open(io.BytesIO(data)).convert("RGB")


def label(sample: dict) -> str:
    """The pair id, and which answer to it when the pair was answered several times (eval.dig --samples N)."""
    index = sample.get("sample")
    return f"{sample['pair_id']} #{index + 1}" if index is not None else str(sample["pair_id"])


def count_text(samples: list[dict]) -> str:
    """ "4 pairs", or "16 answers (4 pairs x 4 samples)": a tile is one answer."""
    pairs = len({str(s["pair_id"]) for s in samples})
    if len(samples) == pairs:
        return f"{pairs} pair{'s' if pairs != 1 else ''}"
    per_pair = len(samples) / pairs if pairs else 0
    shape = f"{pairs} pairs x {per_pair:g} samples" if per_pair.is_integer() else f"{pairs} pairs"
    return f"{len(samples)} answers ({shape})"


def render_tile(sample: dict, pngs: tuple[bytes, bytes] | None) -> Image.Image:
    """A | B at TILE_HEIGHT, GT boxes on both, predictions on B, caption underneath."""
    width, height = sample["width"], sample["height"]
    a, b = (_open(p, width, height) for p in (pngs or (None, None)))
    scale = TILE_HEIGHT / height
    size = (max(1, round(width * scale)), TILE_HEIGHT)
    a, b = a.resize(size, Image.NEAREST), b.resize(size, Image.NEAREST)
    line = max(1, round(TILE_HEIGHT / 100))
    matched = {p["pred"] for p in sample["pairs"] if p["match"]}
    for image, show_pred in ((a, False), (b, True)):
        draw = ImageDraw.Draw(image)
        for box in sample["gt_boxes"]:
            draw_box(draw, box, GT_COLOR, line, scale)
        if show_pred:
            for i, box in enumerate(sample["pred_boxes"]):
                draw_box(draw, box, PRED_COLOR, line, scale, dashed=i not in matched)
    tile = Image.new("RGB", (2 * size[0] + 4, TILE_HEIGHT + CAPTION_HEIGHT), (255, 255, 255))
    tile.paste(a, (0, 0))
    tile.paste(b, (size[0] + 4, 0))
    m = sample["metrics"]
    status = sample.get("error") or f"F1 {m['f1']:.2f}  mIoU {m['miou']:.2f}  pred {int(m['num_pred'])}"
    draw = ImageDraw.Draw(tile)
    draw.text((3, TILE_HEIGHT + 2), f"{label(sample)}  K={sample['num_gt']}", fill=(0, 0, 0))
    draw.text((3, TILE_HEIGHT + 17), status[:90], fill=(0, 0, 0) if not sample.get("error") else PRED_COLOR)
    return tile


def contact_sheet(tiles: list[Image.Image], columns: int) -> Image.Image:
    if not tiles:
        raise ValueError("nothing to draw: no samples")
    columns = max(1, min(columns, len(tiles)))
    cell_w = max(t.width for t in tiles) + 8
    cell_h = max(t.height for t in tiles) + 8
    rows = (len(tiles) + columns - 1) // columns
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), (235, 235, 235))
    for i, tile in enumerate(tiles):
        sheet.paste(tile, ((i % columns) * cell_w + 4, (i // columns) * cell_h + 4))
    return sheet


def html_page(samples: list[dict], tile_files: list[str], title: str) -> str:
    cards = []
    for s, tile in zip(samples, tile_files, strict=True):
        m = s["metrics"]
        facts = (
            f"K={s['num_gt']} · types {html.escape(', '.join(s.get('types') or []) or '—')} · "
            f"score {m['score']:.3f} · F1 {m['f1']:.2f} · P {m['precision']:.2f} · R {m['recall']:.2f} · "
            f"mIoU {m['miou']:.2f} · {int(m['num_pred'])} predicted"
        )
        if s.get("error"):
            facts += f' · <span class="err">format failed: {html.escape(s["error"])}</span>'
        cards.append(
            f'<div class="card"><h3>{html.escape(label(s))}</h3><img src="{html.escape(tile)}" loading="lazy">'
            f"<p>{facts}</p><details><summary>response</summary><pre>{html.escape(s.get('response') or '')}</pre>"
            "</details></div>"
        )
    style = (
        "body{font-family:sans-serif;margin:1em}.card{display:inline-block;vertical-align:top;margin:6px;"
        "padding:6px;border:1px solid #ccc;max-width:640px}.err{color:#c00}pre{white-space:pre-wrap;"
        "max-height:20em;overflow:auto;background:#f6f6f6}h3{margin:2px 0;font-size:1em}"
    )
    legend = (
        "<p>Green: ground truth (on A and B). Red on B: predictions (solid: matched, IoU ≥ threshold; "
        "dashed: unmatched).</p>"
    )
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>{legend}{''.join(cards)}</body></html>\n"
    )


def write_gallery(
    samples: list[dict],
    images: dict[str, tuple[bytes, bytes]],
    out_dir: str | Path,
    title: str = "DiG predictions",
    columns: int = 4,
) -> dict[str, Path]:
    out_dir = Path(out_dir)
    tiles, files = [], []
    for i, s in enumerate(samples):
        tile = render_tile(s, images.get(str(s["pair_id"])))
        name = f"tiles/{i:04d}.png"
        save_png(tile, out_dir / name)
        tiles.append(tile)
        files.append(name)
    sheet_path, page_path = out_dir / "contact_sheet.png", out_dir / "index.html"
    save_png(contact_sheet(tiles, columns), sheet_path)
    atomic_write_text(page_path, html_page(samples, files, title))
    return {"contact_sheet": sheet_path, "html": page_path}


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser(PROG, __doc__)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--samples", metavar="FILE", help="eval.dig *.samples.jsonl")
    source.add_argument("--verl-dump", metavar="FILE", help="a <step>.jsonl from trainer.validation_data_dir")
    parser.add_argument("--data", default=None, metavar="FILE", help="the parquet the pairs come from (for the images)")
    add_model_arg(parser, purpose=", to re-score verl dumps")
    parser.add_argument("--out-dir", required=True, metavar="DIR", help="gallery folder (contact sheet, page, tiles)")
    parser.add_argument(
        "--limit", type=positive_int, default=48, help="at most N tiles (one per answer; a pair sampled n times has n)"
    )
    parser.add_argument("--sort", choices=SORTS, default="order")
    parser.add_argument("--columns", type=positive_int, default=4)
    return parser


@cli_main(PROG)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    if args.data:
        require_file(args.data, "--data", "parquet file")
    if args.samples:
        require_file(args.samples, "--samples")
    else:
        require_file(args.verl_dump, "--verl-dump")
        spec = load_model_spec(args.model)
        knobs = reward_knobs(spec)
        if args.data:  # the dump is re-scored in the model's frame: the rows must be that model's
            check_data_model(args.data, spec, args.model)
    images, by_gt = load_images(args.data)
    if args.samples:
        samples, title = samples_from_eval(args.samples), f"DiG predictions: {args.samples}"
    else:
        samples, title = samples_from_verl_dump(args.verl_dump, knobs, by_gt), f"verl validation: {args.verl_dump}"
    samples = order_samples(samples, args.sort, args.limit)
    paths = write_gallery(samples, images, args.out_dir, title=title, columns=args.columns)
    print(f"eval.visualize: {count_text(samples)} -> {paths['contact_sheet']}, {paths['html']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
