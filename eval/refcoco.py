"""RefCOCO / RefCOCO+ / RefCOCOg referring-expression comprehension (REC): Acc@0.5 and mean IoU per split.

    python -m eval.refcoco --refcoco-dir data/refcoco --model MODEL \
        (--model-path CKPT --backend vllm | --predictions answers.jsonl) --out runs/refcoco.json

Data layout read: the Hugging Face parquet snapshots lmms-eval 0.7.3 reads, one folder per dataset under
``--refcoco-dir`` (``hf download lmms-lab-encoder/RefCOCO --repo-type dataset --local-dir
<refcoco-dir>/RefCOCO``; likewise ``lmms-lab-encoder/RefCOCOplus`` -> ``<refcoco-dir>/RefCOCOplus`` and
``lmms-lab-encoder/RefCOCOg`` -> ``<refcoco-dir>/RefCOCOg``), files ``<folder>/data/<split>-*.parquet`` with the
columns

    question_id: string        image: struct{bytes, path}     question: string (lmms-eval's generic prompt)
    answer: list<string>       (the referring expressions)    bbox: list<float> [x, y, w, h] (COCO, pixels)
    segmentation, iscrowd, file_name (not used)

As in lmms-eval, every expression is one sample (id ``<dataset>:<split>:<question_id>:<k>``). The model is
asked in its own frame (``coord_mode`` of its config file, same wording as the DiG prompt); the answer is
parsed and converted to pixels by the reward's code; the first box counts (none or a format failure: IoU 0).
Both Acc@0.5 conventions are reported: ``acc50_ge`` (IoU >= 0.5, Perception-R1 / lmms-eval) and ``acc50_gt``
(IoU > 0.5, VLM-R1).
"""

from __future__ import annotations

import argparse
import glob
import io
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from string import Template

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from dig_common.argtypes import positive_int
from dig_common.checkpoints import hf_download_command
from dig_common.cli import CliError, cli_main, tool_parser
from dig_common.models import ModelSpec, load_model_spec
from dig_common.prompts import coordinate_frame
from eval.dig import RESUME_HINT, read_predictions, sibling, write_results
from eval.options import add_generation_args, add_model_arg, backend_from_args, check_generation_args
from eval.scoring import reward_knobs
from reward_fns import geometry
from reward_fns.knobs import RewardKnobs
from reward_fns.parsing import ParseError
from reward_fns.scoring import predicted_pixel_boxes

PROG = "python -m eval.refcoco"
# dataset key -> folder under --refcoco-dir (the lmms-lab-encoder repo name) and its standard splits
DATASETS = {
    "refcoco": ("RefCOCO", ("val", "testA", "testB")),
    "refcoco+": ("RefCOCOplus", ("val", "testA", "testB")),
    "refcocog": ("RefCOCOg", ("val", "test")),
}
COLUMNS = ["question_id", "image", "answer", "bbox"]
REC_PROMPT = Template(
    'Locate the object described as "$expression" in the image and give its bounding box. $coordinate_frame\n'
    'Answer with a JSON list holding one object, in this form: [{"bbox_2d": [x1, y1, x2, y2], "label": "$label"}]'
)


@dataclass
class RecSample:
    id: str
    split: str  # "<dataset>:<split>"
    expression: str
    image_bytes: bytes
    width: int
    height: int
    gt_box: list[float]  # [x0, y0, x1, y1] pixels


def parse_splits(text: str) -> list[tuple[str, str]]:
    """``refcoco:val,refcocog:test`` -> [(dataset, split)]; ``all`` -> the 8 standard splits."""
    if text == "all":
        return [(d, s) for d, (_, splits) in DATASETS.items() for s in splits]
    out = []
    for item in text.split(","):
        dataset, _, split = item.strip().partition(":")
        if dataset not in DATASETS or not split:
            raise ValueError(f"--splits: {item!r} is not <dataset>:<split> with dataset in {', '.join(DATASETS)}")
        out.append((dataset, split))
    return out


def download_command(refcoco_dir: str | Path, dataset: str) -> str:
    folder = DATASETS[dataset][0]
    return hf_download_command(f"lmms-lab-encoder/{folder}", local_dir=Path(refcoco_dir) / folder, repo_type="dataset")


def split_files(refcoco_dir: str | Path, dataset: str, split: str) -> list[str]:
    folder = Path(refcoco_dir) / DATASETS[dataset][0] / "data"
    files = sorted(glob.glob(str(folder / f"{split}-*.parquet")))
    if not files:
        raise FileNotFoundError(
            f"no {folder}/{split}-*.parquet; download it with `{download_command(refcoco_dir, dataset)}`"
        )
    missing = [c for c in COLUMNS if c not in pq.read_schema(files[0]).names]
    if missing:
        raise ValueError(f"{files[0]}: missing column(s) {', '.join(missing)} (expected the lmms-lab layout)")
    return files


def iter_samples(refcoco_dir, dataset: str, split: str, limit: int | None = None) -> Iterator[RecSample]:
    count = 0
    for path in split_files(refcoco_dir, dataset, split):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=64, columns=COLUMNS):
            for row in batch.to_pylist():
                image = row["image"]
                data = image["bytes"] if isinstance(image, dict) else image
                width, height = Image.open(io.BytesIO(data)).size  # header only
                x, y, w, h = (float(v) for v in row["bbox"])
                for k, expression in enumerate(row["answer"]):
                    if limit is not None and count >= limit:
                        return
                    count += 1
                    yield RecSample(
                        id=f"{dataset}:{split}:{row['question_id']}:{k}",
                        split=f"{dataset}:{split}",
                        expression=expression,
                        image_bytes=data,
                        width=width,
                        height=height,
                        gt_box=[x, y, x + w, y + h],
                    )


def rec_request(sample: RecSample, spec: ModelSpec) -> list[dict]:
    frame = coordinate_frame(spec)
    label = sample.expression.replace('"', "'")
    text = REC_PROMPT.substitute(expression=label, coordinate_frame=frame, label=label)
    image = Image.open(io.BytesIO(sample.image_bytes)).convert("RGB")
    item = {"type": "image", "image": image, "min_pixels": spec.min_pixels, "max_pixels": spec.max_pixels}
    return [{"role": "user", "content": [item, {"type": "text", "text": text}]}]


def score_rec(response: str, gt_box, width: int, height: int, knobs: RewardKnobs | dict) -> dict:
    """IoU of the first predicted box (the reward's parsing, frame conversion and validation) with the GT box."""
    try:
        pred = predicted_pixel_boxes(response, width, height, RewardKnobs.of(knobs))
    except ParseError as err:
        return {"iou": 0.0, "format": 0.0, "pred_box": None, "error": str(err)}
    if len(pred) == 0:
        return {"iou": 0.0, "format": 1.0, "pred_box": None, "error": "empty list"}
    iou = float(geometry.pairwise_iou(pred[:1], [gt_box])[0, 0])
    return {"iou": iou, "format": 1.0, "pred_box": pred[0].tolist(), "error": None}


def summarize(scores: list[dict]) -> dict:
    ious = np.array([s["iou"] for s in scores], dtype=np.float64)
    if not len(ious):
        return {"n": 0, "acc50_ge": None, "acc50_gt": None, "miou": None, "format_rate": None}
    return {
        "n": len(ious),
        "acc50_ge": float((ious >= 0.5).mean()),
        "acc50_gt": float((ious > 0.5).mean()),
        "miou": float(ious.mean()),
        "format_rate": float(np.mean([s["format"] for s in scores])),
    }


def markdown(splits: dict[str, dict]) -> str:
    def pct(v):
        return "—" if v is None else f"{100 * v:.1f}"

    lines = [
        "| split | n | Acc@0.5 (IoU ≥ 0.5) | Acc@0.5 (IoU > 0.5) | mIoU | format |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, s in splits.items():
        lines.append(
            f"| {name} | {s['n']} | {pct(s['acc50_ge'])} | {pct(s['acc50_gt'])} | {pct(s['miou'])} | "
            f"{pct(s['format_rate'])} |"
        )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser(PROG, __doc__)
    parser.add_argument(
        "--refcoco-dir", required=True, metavar="DIR", help="folder holding RefCOCO/, RefCOCOplus/, RefCOCOg/ snapshots"
    )
    parser.add_argument("--splits", default="all", help="comma list of <dataset>:<split>, or 'all' (8 splits)")
    add_model_arg(parser)
    parser.add_argument("--out", required=True, metavar="FILE", help="results JSON; siblings .md, .samples.jsonl")
    parser.add_argument("--limit", type=positive_int, default=None, help="at most N samples per split (smoke runs)")
    add_generation_args(parser, 'JSON lines {"id", "response"}', batch_size=256)
    return parser


def check_refcoco_dir(refcoco_dir: str | Path, splits: list[tuple[str, str]]) -> None:
    """Every asked split is on disk (a missing one names its download command)."""
    if not Path(refcoco_dir).is_dir():
        commands = "; ".join(download_command(refcoco_dir, d) for d in dict.fromkeys(d for d, _ in splits))
        raise CliError(f"--refcoco-dir {refcoco_dir}: no such folder; download the snapshots: {commands}")
    for dataset, split in splits:
        split_files(refcoco_dir, dataset, split)


@cli_main(PROG, on_interrupt=RESUME_HINT)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    # Everything that can be wrong with the inputs fails here, before a model is loaded.
    spec = load_model_spec(args.model)
    knobs = RewardKnobs.of(reward_knobs(spec))
    splits = parse_splits(args.splits)
    check_refcoco_dir(args.refcoco_dir, splits)
    check_generation_args(args, spec, n=1)
    out = Path(args.out)
    if args.predictions:
        pred_path = Path(args.predictions)
    else:
        from eval.backends import generate_to_file

        pred_path = sibling(out, ".predictions.jsonl")
        backend = backend_from_args(args, spec, n=1)

        def batches():
            batch = []
            for dataset, split in splits:
                for sample in iter_samples(args.refcoco_dir, dataset, split, args.limit):
                    batch.append((sample.id, rec_request(sample, spec)))
                    if len(batch) == args.batch_size:
                        yield batch
                        batch = []
            if batch:
                yield batch

        generate_to_file(backend, batches(), pred_path, "id")
    predictions = read_predictions(pred_path, id_key="id")

    per_split: dict[str, list[dict]] = {}
    details = []
    for dataset, split in splits:
        scores = per_split.setdefault(f"{dataset}:{split}", [])
        for sample in iter_samples(args.refcoco_dir, dataset, split, args.limit):
            response = predictions.get(sample.id)
            if response is None:
                raise ValueError(f"{pred_path}: no answer for {sample.id}")
            s = score_rec(response, sample.gt_box, sample.width, sample.height, knobs)
            scores.append(s)
            details.append({"id": sample.id, "expression": sample.expression, "gt_box": sample.gt_box, **s})
    results = {
        "model": spec.model_name,
        "coord_mode": spec.coord_mode,
        "splits": {name: summarize(scores) for name, scores in per_split.items()},
    }
    write_results(out, results, markdown(results["splits"]), details, "eval.refcoco")
    return 0


if __name__ == "__main__":
    sys.exit(main())
