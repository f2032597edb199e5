"""DiG held-out evaluation: score answers on the test parquet, per K and per change type.

    # answers produced elsewhere, one {"pair_id", "response"} per line
    python -m eval.dig --data test.parquet --predictions answers.jsonl --model MODEL --out results.json
    # generate them from a checkpoint first (vLLM on GPU, HF transformers anywhere)
    python -m eval.dig --data test.parquet --model-path CKPT --backend vllm --model MODEL --out results.json

``--model`` defaults to ``dig_common.models.DEFAULT_MODEL``. Bad input (a missing file, an unknown model, a
checkpoint without its processor files, vLLM not installed) is one ``python -m eval.dig: error:`` line, exit 2.

Writes ``results.json`` (sections ``overall``, ``per_k``, ``per_type``, ``no_difference``), ``results.md``
(the same as a markdown table) and ``results.samples.jsonl`` (one scored pair per line: predicted and GT
boxes in pixels, matched pairs; ``python -m eval.visualize`` draws it). Generated answers go to
``results.predictions.jsonl`` as they finish, so a rerun resumes where it stopped.

Scoring is the reward's (``eval.scoring`` wraps ``reward_fns.scoring``), with the model's frame and pixel
bounds from its config file: a number here is the number the reward gave during validation.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from dig_common.argtypes import positive_int
from dig_common.cli import cli_main, tool_parser
from dig_common.fileio import atomic_write_text
from dig_common.models import DEFAULT_MODEL, ModelSpec, load_model_spec
from dig_common.parquet import model_mismatch, open_parquet, recorded_model
from eval.options import (
    add_generation_args,
    add_model_arg,
    backend_from_args,
    check_generation_args,
    parse_reward_kwargs,
)
from eval.scoring import ScoredAnswer, reward_knobs, score_response

PROG = "python -m eval.dig"
SCORE_COLUMNS = ["data_source", "reward_model", "extra_info"]
METRIC_KEYS = ("precision", "recall", "f1", "miou", "count_accuracy")


# ----------------------------------------------------------------------------------------------- data


def read_rows(path: str | Path, columns: list[str] | None = None) -> list[dict]:
    """Rows of a DiG parquet (docs/contracts.md, parquet row) as dicts; ``columns`` limits what is read (images are large)."""
    parquet = open_parquet(path)
    names = parquet.schema_arrow.names
    wanted = columns or names
    missing = [c for c in wanted if c not in names]
    if missing:
        raise ValueError(
            f"{path}: missing column(s) {', '.join(missing)} (a parquet row (docs/contracts.md) has {SCORE_COLUMNS})"
        )
    try:
        rows = parquet.read(columns=wanted).to_pylist()
    except (OSError, pa.ArrowException) as err:
        raise ValueError(f"--data {path}: cannot read its rows ({err}); rebuild it with data_prep.build") from err
    for i, row in enumerate(rows):
        extra = row.get("extra_info") or {}
        if "extra_info" in wanted and not extra.get("pair_id"):
            raise ValueError(f"{path}: row {i} has no extra_info.pair_id")
    return rows


def iter_row_batches(path: str | Path, batch_size: int, columns: list[str] | None = None) -> Iterator[list[dict]]:
    """Stream rows with their images in batches (generation needs the PNG bytes, scoring does not)."""
    parquet = open_parquet(path)
    for batch in parquet.iter_batches(batch_size=batch_size, columns=columns):
        yield batch.to_pylist()


def pair_id(row: dict) -> str:
    return str(row["extra_info"]["pair_id"])


def ground_truth(row: dict) -> str:
    return row["reward_model"]["ground_truth"]


def difference_types(row: dict) -> list[str] | None:
    """Change type per GT box, aligned with the boxes: the ground truth's ``types`` key, else extra_info's."""
    gt = json.loads(ground_truth(row))
    types = gt.get("types")
    if types is None:
        types = (row.get("extra_info") or {}).get("types")
    if types is None or len(types) != len(gt["boxes"]):
        return None
    return [str(t) for t in types]


def read_predictions(path: str | Path, id_key: str = "pair_id") -> dict[str, str]:
    """``{id: response}`` from a JSON-lines file of ``{id_key, "response"}``; duplicate ids or malformed lines
    are errors. Shared by eval.dig (``pair_id``) and eval.refcoco (``id``)."""
    out: dict[str, str] = {}
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                pid, response = str(record[id_key]), record["response"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise ValueError(
                    f'{path}:{number}: expected {{"{id_key}", "response"}}, got {line[:80]!r} ({err})'
                ) from err
            if pid in out:
                raise ValueError(f"{path}:{number}: {id_key} {pid!r} appears twice")
            if not isinstance(response, str):
                raise ValueError(f"{path}:{number}: response of {pid!r} is not a string")
            out[pid] = response
    return out


# ----------------------------------------------------------------------------------------------- aggregation


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def summarize(samples: list[dict]) -> dict:
    """Pair-level means: the reward's precision/recall/F1/mIoU, count accuracy (format ok and N == K),
    plus the format rate, mean reward score and mean number of predicted boxes."""
    if not samples:
        return {"n": 0, **dict.fromkeys(METRIC_KEYS), "format_rate": None, "score": None, "mean_num_pred": None}
    m = [s["metrics"] for s in samples]
    return {
        "n": len(samples),
        "precision": _mean([x["precision"] for x in m]),
        "recall": _mean([x["recall"] for x in m]),
        "f1": _mean([x["f1"] for x in m]),
        "miou": _mean([x["miou"] for x in m]),
        "count_accuracy": _mean([float(x["format"] == 1.0 and x["num_pred"] == x["num_gt"]) for x in m]),
        "format_rate": _mean([x["format"] for x in m]),
        "score": _mean([x["score"] for x in m]),
        "mean_num_pred": _mean([x["num_pred"] for x in m]),
    }


def per_type_summary(samples: list[dict]) -> dict:
    """Per change type t. Box level (what a type-specific number can mean, predictions carry no type):
    ``n`` GT boxes of type t, ``recall`` = share of them matched (IoU >= threshold), ``miou`` = mean IoU of
    those that got a Hungarian partner. Pair level, over the ``n_pairs`` pairs holding a type-t difference:
    ``precision``, ``pair_recall``, ``f1``, ``count_accuracy`` (means of the reward's per-pair values)."""
    boxes: dict[str, list[tuple[bool, float | None]]] = defaultdict(list)
    pairs: dict[str, list[dict]] = defaultdict(list)
    for s in samples:
        types = s.get("types")
        if types is None:
            continue
        partner = {p["gt"]: p for p in s["pairs"]}
        for j, t in enumerate(types):
            p = partner.get(j)
            boxes[t].append((bool(p and p["match"]), p["iou"] if p else None))
        for t in set(types):
            pairs[t].append(s)
    out = {}
    for t in sorted(boxes):
        pair_stats = summarize(pairs[t])
        ious = [iou for _, iou in boxes[t] if iou is not None]
        out[t] = {
            "n": len(boxes[t]),
            "recall": _mean([float(hit) for hit, _ in boxes[t]]),
            "miou": _mean(ious) if ious else 0.0,
            "precision": pair_stats["precision"],
            "pair_recall": pair_stats["recall"],
            "f1": pair_stats["f1"],
            "count_accuracy": pair_stats["count_accuracy"],
            "n_pairs": pair_stats["n"],
        }
    return out


def per_difficulty_summary(samples: list[dict], bins: int = 3) -> dict:
    """GT boxes binned by how many pixels of the changed object are visible (extra_info.difficulty.visible_px,
    terciles over this eval set: bin 1 = least visible). Box level like per_type: ``n``, ``recall``, ``miou``;
    ``visible_px`` = [low, high] of the bin. Empty when the rows carry no difficulty."""
    boxes = []
    for s in samples:
        visible = s.get("visible_px") or []
        if len(visible) != s["num_gt"]:
            continue
        partner = {p["gt"]: p for p in s["pairs"]}
        for j, v in enumerate(visible):
            if v is not None:
                p = partner.get(j)
                boxes.append((v, bool(p and p["match"]), p["iou"] if p else None))
    if not boxes:
        return {}
    edges = np.quantile([b[0] for b in boxes], np.linspace(0, 1, bins + 1))
    out = {}
    for i in range(bins):
        lo, hi = edges[i], edges[i + 1]
        inside = [b for b in boxes if lo <= b[0] <= hi and (i == bins - 1 or b[0] < hi)]
        ious = [iou for _, _, iou in inside if iou is not None]
        out[f"visible_px_bin{i + 1}"] = {
            "visible_px": [int(lo), int(hi)],
            "n": len(inside),
            "recall": _mean([float(hit) for _, hit, _ in inside]),
            "miou": _mean(ious) if ious else (0.0 if inside else None),
        }
    return out


def no_difference_summary(samples: list[dict]) -> dict:
    """Pairs with K = 0: hallucination rate = share answered (format ok) with at least one box."""
    empty = [s for s in samples if s["num_gt"] == 0]
    if not empty:
        return {"n": 0, "hallucination_rate": None, "format_fail_rate": None}
    ok = [s for s in empty if s["metrics"]["format"] == 1.0]
    return {
        "n": len(empty),
        "hallucination_rate": _mean([float(s["metrics"]["num_pred"] > 0) for s in empty]),
        "format_fail_rate": 1.0 - len(ok) / len(empty),
    }


def aggregate(samples: list[dict]) -> dict:
    by_k: dict[int, list[dict]] = defaultdict(list)
    for s in samples:
        by_k[s["num_gt"]].append(s)
    return {
        "overall": summarize(samples),
        "per_k": {str(k): summarize(by_k[k]) for k in sorted(by_k)},
        "per_type": per_type_summary(samples),
        "per_difficulty": per_difficulty_summary(samples),
        "no_difference": no_difference_summary(samples),
    }


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100.0 * value:.1f}"


def markdown(results: dict) -> str:
    """Two tables (values in percent): pairs (overall, one row per K), then change types, whose box-level
    columns (a type belongs to a GT box) and pair-level columns (a prediction has no type) are labelled apart."""
    lines = [
        "| subset | pairs | precision | recall | F1 | mIoU | count acc |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def row(label: str, stats: dict) -> None:
        cells = [_pct(stats.get(k)) for k in METRIC_KEYS]
        lines.append(f"| {label} | {stats['n']} | " + " | ".join(cells) + " |")

    row("**overall**", results["overall"])
    for k, stats in results["per_k"].items():
        row(f"K = {k}", stats)
    if results["per_type"]:
        lines += [
            "",
            "| change type | GT boxes | box recall | box mIoU | pairs with it | pair precision | pair recall | "
            "pair F1 | pair count acc |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for t, st in results["per_type"].items():
            cells = [_pct(st[k]) for k in ("recall", "miou")] + [str(st["n_pairs"])]
            cells += [_pct(st[k]) for k in ("precision", "pair_recall", "f1", "count_accuracy")]
            lines.append(f"| {t} | {st['n']} | " + " | ".join(cells) + " |")
    nd = results["no_difference"]
    lines.append("")
    lines.append(
        f"No-difference pairs: {nd['n']}; hallucination rate {_pct(nd['hallucination_rate'])} %"
        if nd["n"]
        else "No-difference pairs: none in this set (hallucination rate not measured)."
    )
    lines.append(
        f"Format rate {_pct(results['overall']['format_rate'])} %, mean reward score "
        f"{results['overall']['score']:.3f}, mean boxes per answer {results['overall']['mean_num_pred']:.2f}."
        if results["overall"]["n"]
        else ""
    )
    return "\n".join(lines).rstrip() + "\n"


# ----------------------------------------------------------------------------------------------- samples


def read_sampled_predictions(path: str | Path, id_key: str = "pair_id") -> tuple[dict[str, list[str]], dict]:
    """``({id: [response per sample]}, {id: [truncated per sample]})`` from a predictions file. Lines written
    by eval.backends carry ``responses`` and ``truncated``; a plain ``{id, "response"}`` line is one sample
    with an unknown token-limit flag (None). Validation (duplicates, malformed lines) is read_predictions'."""
    first = read_predictions(path, id_key)
    responses: dict[str, list[str]] = {pid: [text] for pid, text in first.items()}
    truncated: dict[str, list] = {pid: [None] for pid in first}
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            record = json.loads(line)
            if "responses" not in record:
                continue
            pid, texts = str(record[id_key]), record["responses"]
            flags = record.get("truncated") or [None] * len(texts)
            if not texts or texts[0] != record["response"] or len(flags) != len(texts):
                raise ValueError(f"{path}:{number}: 'responses' must start with 'response' and match 'truncated'")
            responses[pid], truncated[pid] = list(texts), list(flags)
    counts = {len(v) for v in responses.values()}
    if len(counts) > 1:
        raise ValueError(f"{path}: ids have different numbers of samples ({sorted(counts)}); rerun into a new --out")
    return responses, truncated


def score_samples(rows: list[dict], responses: dict[str, list[str]], knobs: dict, allow_missing: bool) -> list[dict]:
    """score_rows once per sample index; each scored pair records its ``sample``."""
    n = max((len(v) for v in responses.values()), default=1)
    out = []
    for index in range(n):
        predictions = {pid: texts[index] for pid, texts in responses.items()}
        out += [{**s, "sample": index} for s in score_rows(rows, predictions, knobs, allow_missing=allow_missing)]
    return out


def sampling_summary(samples: list[dict]) -> dict:
    """Over the n samples per pair: each sample's overall numbers, their mean and spread (population std;
    0 for one sample). The main sections pool all samples, i.e. they are these means."""
    by_index: dict[int, list[dict]] = defaultdict(list)
    for s in samples:
        by_index[s.get("sample", 0)].append(s)
    per_sample = [summarize(by_index[i]) for i in sorted(by_index)]
    values = {k: [p[k] for p in per_sample if p[k] is not None] for k in (*METRIC_KEYS, "format_rate", "score")}
    mean = {k: _mean(v) for k, v in values.items()}
    std = {k: float(np.std(v)) if v else None for k, v in values.items()}
    return {"n": len(per_sample), "mean": mean, "std": std, "per_sample": per_sample}


def truncation_summary(responses: dict[str, list[str]], truncated: dict[str, list], require_think: bool) -> dict:
    """Share of answers that did not finish: cut at the token limit (where the backend knows) or, for a
    thinking model, without a closed ``</think>`` (its thought never ended, so there is no answer)."""
    texts = [(t, flag) for pid in responses for t, flag in zip(responses[pid], truncated[pid], strict=True)]
    if not texts:
        return {"n": 0, "rate": None, "hit_limit": None, "unclosed_think": None}
    unclosed = [require_think and "</think>" not in t for t, _ in texts]
    hit = [bool(flag) for _, flag in texts]
    known = any(flag is not None for _, flag in texts)
    return {
        "n": len(texts),
        "rate": _mean([float(a or b) for a, b in zip(unclosed, hit, strict=True)]),
        "hit_limit": _mean([float(h) for h in hit]) if known else None,
        "unclosed_think": _mean([float(u) for u in unclosed]) if require_think else None,
    }


def sampling_markdown(results: dict) -> str:
    """Lines under the table: decoding used, mean +- spread over the samples, truncation rate."""
    dec, spread, trunc = results["decoding"], results["sampling"], results["truncation"]
    if dec is None:
        mode = f"answers read from {results['predictions']}"
    elif dec["temperature"] == 0:
        mode = f"greedy, max_new_tokens={dec['max_new_tokens']}"
    else:
        mode = (
            f"sampling T={dec['temperature']}, top_p={dec['top_p']}, top_k={dec['top_k']}, presence_penalty="
            f"{dec['presence_penalty']}, seed={dec['seed']}, max_new_tokens={dec['max_new_tokens']}"
        )
    lines = [f"Decoding: {mode}; {spread['n']} sample(s) per pair."]
    if spread["n"] > 1:
        shown = (("f1", "F1"), ("miou", "mIoU"), ("recall", "recall"), ("count_accuracy", "count acc"))
        cells = [f"{name} {_pct(spread['mean'][k])} ± {_pct(spread['std'][k])}" for k, name in shown]
        lines.append(f"Mean ± std over the {spread['n']} samples: " + ", ".join(cells) + " %.")
    if trunc["n"]:
        parts = []
        if trunc["hit_limit"] is not None:
            parts.append(f"cut at the token limit {_pct(trunc['hit_limit'])} %")
        if trunc["unclosed_think"] is not None:
            parts.append(f"no closed </think> {_pct(trunc['unclosed_think'])} %")
        lines.append(f"Truncated answers: {_pct(trunc['rate'])} %" + (f" ({'; '.join(parts)})" if parts else "") + ".")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- driver


def score_rows(
    rows: Iterable[dict], predictions: dict[str, str], knobs: dict, allow_missing: bool = False
) -> list[dict]:
    rows = list(rows)
    known = {pair_id(r) for r in rows}
    unknown = sorted(set(predictions) - known)
    if unknown:
        raise ValueError(f"predictions name {len(unknown)} pair_id(s) not in --data, e.g. {unknown[:3]}")
    missing = [pair_id(r) for r in rows if pair_id(r) not in predictions]
    if missing and not allow_missing:
        raise ValueError(
            f"{len(missing)} of {len(rows)} pairs have no prediction (e.g. {missing[:3]}); "
            "pass --allow-missing to score them as format failures"
        )
    samples = []
    for r in rows:
        pid = pair_id(r)
        response = predictions.get(pid)
        scored: ScoredAnswer = score_response(response if response is not None else "", ground_truth(r), knobs)
        if response is None:
            scored.error = "no prediction"
        samples.append(
            {
                "pair_id": pid,
                "num_gt": len(scored.gt_boxes),
                "types": difference_types(r),
                "visible_px": [d.get("visible_px") for d in (r.get("extra_info") or {}).get("difficulty") or []],
                "response": response,
                **scored.to_json(),
            }
        )
    return samples


def sibling(out: Path, suffix: str) -> Path:
    """results.json -> results.<suffix> (results.md, results.samples.jsonl, ...)."""
    return out.with_name(out.stem + suffix)


def write_results(out: Path, results: dict, table: str, samples: list[dict], tool: str) -> None:
    """An eval's three files, each atomically: ``out`` (``results`` with the ``table`` under "markdown"), the
    table as ``<stem>.md`` and one scored sample per line in ``<stem>.samples.jsonl`` (eval.dig, eval.refcoco)."""
    results["markdown"] = table
    written = [out, sibling(out, ".md"), sibling(out, ".samples.jsonl")]
    atomic_write_text(written[0], json.dumps(results, indent=2))
    atomic_write_text(written[1], table)
    atomic_write_text(written[2], "".join(json.dumps(s) + "\n" for s in samples))
    print(table)
    print(f"{tool}: wrote {', '.join(map(str, written))}", file=sys.stderr)


def check_data_model(data: str | Path, spec: ModelSpec, model_flag: str) -> None:
    """Refuse to score rows written for another model: its frame or pixel bounds would score right answers 0."""
    parquet = open_parquet(data)
    why = model_mismatch(parquet, spec)
    if why is None:
        return
    built_for = recorded_model(parquet)
    given = f"--model {model_flag}" + (" (the default)" if model_flag == DEFAULT_MODEL else "")
    fix = f"pass --model {built_for}" if built_for else "pass the --model it was built with"
    raise ValueError(
        f"--data {data} was built for {built_for or 'another model'}, not for {given}: {why}; {fix}, or rebuild "
        f"the data with data_prep.build --model {spec.model_name}"
    )


def generate_predictions(args, spec, out: Path) -> Path:
    """Run the backend over the pairs that have no answer yet; answers are appended as batches finish."""
    from eval.backends import dig_request, generate_to_file, read_done

    pred_path = sibling(out, ".predictions.jsonl")
    done = read_done(pred_path, "pair_id")
    todo = [pid for pid in (pair_id(r) for r in read_rows(args.data, ["extra_info"])) if pid not in done]
    print(f"eval.dig: {len(done)} answers on file, {len(todo)} to generate with {args.backend}", flush=True)
    if not todo:
        return pred_path
    backend = backend_from_args(args, spec, n=args.samples)
    batches = (
        [(pair_id(r), dig_request(r)) for r in batch if pair_id(r) not in done]
        for batch in iter_row_batches(args.data, args.batch_size)
    )
    generate_to_file(backend, batches, pred_path, "pair_id")
    return pred_path


def build_parser() -> argparse.ArgumentParser:
    parser = tool_parser(PROG, __doc__)
    parser.add_argument("--data", required=True, metavar="FILE", help="test parquet (data_prep.to_verl output)")
    add_model_arg(parser)
    parser.add_argument("--out", required=True, metavar="FILE", help="results JSON; siblings .md, .samples.jsonl")
    parser.add_argument("--reward-kwargs", default="{}", help="JSON object of reward knob overrides")
    parser.add_argument("--allow-missing", action="store_true", help="score pairs without a prediction as failures")
    add_generation_args(parser, 'JSON lines {"pair_id", "response"}', batch_size=64)
    parser.add_argument("--samples", type=positive_int, default=None, help="answers per pair; default: dig.decoding.n")
    return parser


# answers are appended per finished batch (eval.backends.generate_to_file), which a rerun skips
RESUME_HINT = "the answers of finished batches are in <out>.predictions.jsonl; rerun the same command to resume"


@cli_main(PROG, on_interrupt=RESUME_HINT)
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    # Everything that can be wrong with the inputs fails here, before a model is loaded.
    spec = load_model_spec(args.model)
    knobs = reward_knobs(spec, **parse_reward_kwargs(args.reward_kwargs))
    decoding = check_generation_args(args, spec, n=args.samples)
    out = Path(args.out)
    rows = read_rows(args.data, SCORE_COLUMNS)
    check_data_model(args.data, spec, args.model)
    pred_path = Path(args.predictions) if args.predictions else generate_predictions(args, spec, out)
    responses, truncated = read_sampled_predictions(pred_path)
    samples = score_samples(rows, responses, knobs, args.allow_missing)

    results = {
        "data": str(args.data),
        "predictions": str(pred_path),
        "model": spec.model_name,
        "reward_kwargs": knobs,
        **aggregate(samples),
        "decoding": None if args.predictions else asdict(decoding),
        "sampling": sampling_summary(samples),
        "truncation": truncation_summary(responses, truncated, spec.require_think),
    }
    write_results(out, results, markdown(results) + sampling_markdown(results), samples, "eval.dig")
    return 0


if __name__ == "__main__":
    sys.exit(main())
