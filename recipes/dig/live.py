"""A live picture of training: verl's validation dumps -> TensorBoard (and W&B) images and reward curves.

    python -m recipes.dig.live --dump-dir DIR --data VAL.parquet --model MODEL --logdir LOGDIR   (backfill a run)

verl writes ``<trainer.validation_data_dir>/<global_step>.jsonl`` after each validation (one JSON line per answer:
input, output, ground truth, score, step and the reward's keys). A :class:`Watcher` started by
``recipes/dig/main.py`` (a daemon thread in the driver, :func:`watching`) polls that folder and, for each step's
complete dump, writes

* one image, tag ``dig/val_pairs``: the first ``live.pictures`` pairs of the validation set (sorted pair ids, the
  same pairs every step), ground truth green on A and B, predictions red on B (``eval.visualize``'s tiles);
* the reward's components averaged over the dump's answers, under ``dig/val/<name>`` (:data:`CURVES`),

at step = the dump's step, to TensorBoard (its own event file in verl's TensorBoard folder: one run) when
``tensorboard`` is in ``trainer.logger``, and to W&B when ``wandb`` is (the run verl logs to, in W&B's shared mode).
verl is not patched. A dump counts as complete when every line parses and its size did not change since the
previous poll (after training: when every line parses). Each step is logged once, also across a resumed run: the
steps done are kept in ``<dump dir>/.dig_live.json``. An error is one ``[dig.live]`` line; training goes on.
docs/watching.md has the tags and the knobs.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from dig_common.argtypes import positive_int
from dig_common.cli import cli_main, tool_parser
from dig_common.fileio import atomic_write_text
from eval.dig import check_data_model
from eval.options import add_model_arg, require_file
from eval.scoring import reward_knobs
from eval.visualize import (
    contact_sheet,
    load_images,
    render_tile,
    sample_from_verl_row,
    verl_ground_truth,
    verl_rows,
)
from reward_fns.dig_reward import ERROR_KEY

PROG = "python -m recipes.dig.live"
PICTURE_TAG = "dig/val_pairs"
CURVE_PREFIX = "dig/val/"
# W&B's x axis for our keys: the dump's step (another process logs to the run, so no shared `step=`)
WANDB_STEP_KEY = "dig/val/step"
# reward key (reward_fns.dig_reward.RESULT_KEYS) -> readable curve name, under CURVE_PREFIX
CURVES = {
    "score": "score",
    "acc": "acc",
    "format": "format_rate",
    "f1": "f1",
    "precision": "precision",
    "recall": "recall",
    "miou": "mIoU",
    "num_pred": "predicted_boxes",
    "num_gt": "true_boxes",
    ERROR_KEY: "reward_errors",
}
STATE_FILE = ".dig_live.json"  # in the dump folder: {"done": [steps], "rows": most answers seen in one dump}
COLUMNS = 2  # tiles per row of the picture
LOG_PREFIX = "[dig.live]"


def log(message: str) -> None:
    print(f"{LOG_PREFIX} {' '.join(str(message).split())}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- one dump


def dump_steps(dump_dir: Path) -> list[int]:
    """The steps that have a ``<step>.jsonl`` in ``dump_dir``, ascending."""
    if not dump_dir.is_dir():
        return []
    return sorted(int(p.stem) for p in dump_dir.glob("*.jsonl") if p.stem.isdigit())


def curves(rows: list[dict]) -> dict[str, float]:
    """Each reward component's mean over the answers that carry it, under its readable name."""
    out = {}
    for key, name in CURVES.items():
        values = [float(row[key]) for row in rows if isinstance(row.get(key), int | float)]
        if values:
            out[CURVE_PREFIX + name] = sum(values) / len(values)
    return out


def pair_key(row: dict, by_gt: dict[str, str]) -> str:
    """The pair an answer is about: its pair id (joined by ground truth), else the ground-truth string itself."""
    gts = verl_ground_truth(row)
    return by_gt.get(gts, gts)


def sample_rank(row: dict) -> tuple[int, int]:
    """Which of a pair's answers to draw: verl keys them ``{uid}_{session}_{index}`` (session: the sample, 0..n-1;
    index: the turn); the first sample's final turn ranks first. The uid itself is new every validation."""
    parts = str(row.get("uid", "")).rsplit("_", 2)
    if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
        return int(parts[1]), -int(parts[2])
    return 0, 0


def chosen_rows(rows: list[dict], by_gt: dict[str, str], pictures: int) -> list[tuple[str, dict]]:
    """The ``pictures`` first pairs in sorted order, each with its first sample's answer: the same every step."""
    first: dict[str, dict] = {}
    for row in rows:
        key = pair_key(row, by_gt)
        if key not in first or sample_rank(row) < sample_rank(first[key]):
            first[key] = row
    return [(key, first[key]) for key in sorted(first)[:pictures]]


class TensorBoardSink:
    """A SummaryWriter of its own in verl's TensorBoard folder (TensorBoard shows the folder as one run)."""

    def __init__(self, logdir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.logdir = Path(logdir)
        self.writer = SummaryWriter(str(logdir), filename_suffix=".dig_live")

    def log(self, step: int, scalars: dict[str, float], picture: Image.Image | None, caption: str) -> None:
        import numpy as np

        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)
        if picture is not None:
            self.writer.add_image(PICTURE_TAG, np.asarray(picture.convert("RGB")), step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def wandb_settings(environ: dict | None = None):
    """W&B's shared mode as a secondary writer of verl's run; under WANDB_MODE=offline/disabled, that mode (shared
    mode needs the server). Never the driver's console: verl's process owns the run's output log."""
    import wandb

    mode = (os.environ if environ is None else environ).get("WANDB_MODE", "").strip().lower()
    if mode in ("offline", "disabled", "dryrun"):
        return wandb.Settings(console="off")
    return wandb.Settings(
        mode="shared", x_primary=False, x_label="dig-live", x_update_finish_state=False, console="off"
    )


class WandbSink:
    """The W&B run verl logs to (same id: WANDB_RUN_ID); opened at the first dump, when verl's run exists."""

    def __init__(self, project: str, name: str, run_id: str, entity: str | None = None):
        self.project, self.name, self.run_id, self.entity = project, name, run_id, entity
        self.run = None

    def _open(self):
        import wandb

        self.run = wandb.init(
            project=self.project,
            name=self.name,
            id=self.run_id,
            entity=self.entity,
            settings=wandb_settings(),
            reinit="create_new",
        )
        self.run.define_metric(WANDB_STEP_KEY, hidden=True)
        self.run.define_metric(CURVE_PREFIX + "*", step_metric=WANDB_STEP_KEY)
        self.run.define_metric(PICTURE_TAG, step_metric=WANDB_STEP_KEY)
        return self.run

    def log(self, step: int, scalars: dict[str, float], picture: Image.Image | None, caption: str) -> None:
        import wandb

        run = self.run or self._open()
        record = {**scalars, WANDB_STEP_KEY: step}
        if picture is not None:
            record[PICTURE_TAG] = wandb.Image(picture, caption=caption)
        run.log(record)

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()


# ----------------------------------------------------------------------------------------------- the watcher


class Watcher:
    """Turns each complete ``<step>.jsonl`` of ``dump_dir`` into one picture and the reward curves, once."""

    def __init__(
        self,
        dump_dir: str | Path,
        sinks: Sequence,
        knobs: dict,
        val_files: Sequence[str | Path] = (),
        pictures: int = 4,
        poll_seconds: float = 10.0,
        state_path: str | Path | None = None,
    ):
        self.dump_dir = Path(dump_dir)
        self.sinks = list(sinks)
        self.knobs = knobs
        self.val_files = [Path(f) for f in val_files]
        self.pictures = pictures
        self.poll_seconds = poll_seconds
        self.state_path = Path(state_path) if state_path else self.dump_dir / STATE_FILE
        state = self._read_state()
        self.done: set[int] = set(state.get("done", []))
        self.rows_seen: int = int(state.get("rows", 0))
        self._sizes: dict[int, int] = {}  # step -> size at the previous poll
        self._reported: dict[int, int] = {}  # step -> size whose error was logged (one line per version)
        self._by_gt: dict[str, str] | None = None
        self._images: dict[str, tuple[bytes, bytes]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _read_state(self) -> dict:
        try:
            return json.loads(self.state_path.read_text()) if self.state_path.is_file() else {}
        except (OSError, ValueError) as err:
            log(f"{self.state_path}: unreadable ({err}); starting with no step done")
            return {}

    def _write_state(self) -> None:
        atomic_write_text(self.state_path, json.dumps({"done": sorted(self.done), "rows": self.rows_seen}) + "\n")

    # -- images

    def _join(self) -> dict[str, str]:
        if self._by_gt is None:
            self._by_gt = {}
            for path in self.val_files:
                self._by_gt.update(load_images(path, pair_ids=())[1])
        return self._by_gt

    def _pngs(self, pair_ids: list[str]) -> dict[str, tuple[bytes, bytes]]:
        missing = {p for p in pair_ids if p not in self._images and p in self._join().values()}
        for path in self.val_files if missing else ():
            self._images.update(load_images(path, pair_ids=missing)[0])
        return self._images

    def picture(self, rows: list[dict]) -> tuple[Image.Image | None, str]:
        """The contact sheet of the chosen pairs (None when ``pictures`` is 0 or the dump is empty)."""
        if self.pictures <= 0 or not rows:
            return None, ""
        by_gt = self._join()
        chosen = chosen_rows(rows, by_gt, self.pictures)
        pngs = self._pngs([key for key, _ in chosen])
        known = set(by_gt.values())
        # an answer whose ground truth is in no val parquet keeps its place, unnamed, on a blank canvas
        names = [key if key in known else f"pair {i + 1} (not in data.val_files)" for i, (key, _) in enumerate(chosen)]
        tiles = [
            render_tile(sample_from_verl_row(row, self.knobs, name), pngs.get(key))
            for name, (key, row) in zip(names, chosen, strict=True)
        ]
        return contact_sheet(tiles, COLUMNS), f"validation pairs: {', '.join(names)}"

    # -- polling

    def _complete(self, step: int, final: bool) -> list[dict] | None:
        """The dump's rows when it is complete, None to wait; a bad dump raises ValueError."""
        path = self.dump_dir / f"{step}.jsonl"
        size = path.stat().st_size
        stable = self._sizes.get(step) == size
        self._sizes[step] = size
        if size == 0 or not (stable or final):
            return None
        try:
            rows = verl_rows(path)
        except ValueError:
            if not final and path.read_bytes()[-1:] != b"\n":
                return None  # a line still being written
            raise
        if len(rows) < self.rows_seen and not final:
            return None  # fewer answers than an earlier validation: verl is still writing it
        return rows

    def process(self, step: int, rows: list[dict]) -> None:
        scalars = curves(rows)
        picture, caption = self.picture(rows)
        for sink in self.sinks:
            sink.log(step, scalars, picture, caption)
        self.done.add(step)
        self.rows_seen = max(self.rows_seen, len(rows))
        self._write_state()

    def poll(self, final: bool = False) -> list[int]:
        """One look at the dump folder; the steps logged now. ``final``: training is over, take every dump whose
        lines all parse."""
        logged = []
        for step in dump_steps(self.dump_dir):
            if step in self.done:
                continue
            try:
                rows = self._complete(step, final)
                if rows is None:
                    continue
                self.process(step, rows)
                logged.append(step)
            except Exception as err:  # noqa: BLE001 - the watcher never stops training: one line, go on
                size = self._sizes.get(step, -1)
                if self._reported.get(step) != size:
                    self._reported[step] = size
                    log(f"step {step} ({self.dump_dir / f'{step}.jsonl'}) not logged: {type(err).__name__}: {err}")
        return logged

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.poll()
            except Exception as err:  # noqa: BLE001
                log(f"poll of {self.dump_dir} failed: {type(err).__name__}: {err}")

    def start(self) -> Watcher:
        self._thread = threading.Thread(target=self._loop, name="dig-live", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop polling, take what is left (the final pass), close the sinks."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.poll(final=True)
        finally:
            for sink in self.sinks:
                try:
                    sink.close()
                except Exception as err:  # noqa: BLE001
                    log(f"closing {type(sink).__name__} failed: {type(err).__name__}: {err}")


# ----------------------------------------------------------------------------------------------- from the config


def tensorboard_dir(config) -> str:
    """Where verl's TensorBoard logger writes: TENSORBOARD_DIR of the Ray runtime env, else of this process, else
    verl's default (verl/utils/tracking.py)."""
    env_vars = config.get("ray_kwargs", {}).get("ray_init", {}).get("runtime_env", {}).get("env_vars", {}) or {}
    project, name = config.trainer.project_name, config.trainer.experiment_name
    return str(
        env_vars.get("TENSORBOARD_DIR") or os.environ.get("TENSORBOARD_DIR") or f"tensorboard_log/{project}/{name}"
    )


def share_wandb_run(config) -> str:
    """Give verl's W&B run a known id (yours: WANDB_RUN_ID; else a new one) through the Ray runtime env, in shared
    mode unless WANDB_MODE is set, so that our pictures land in the same run. Returns the id."""
    from omegaconf import open_dict

    run_id = os.environ.get("WANDB_RUN_ID", "").strip() or uuid.uuid4().hex[:12]
    with open_dict(config):
        env_vars = config.ray_kwargs.ray_init.runtime_env.env_vars
        env_vars["WANDB_RUN_ID"] = run_id
        if not os.environ.get("WANDB_MODE", "").strip() and "WANDB_MODE" not in env_vars:
            env_vars["WANDB_MODE"] = "shared"
    return run_id


def from_config(config) -> Watcher | None:
    """The watcher of a training run (None when ``live.pictures`` is 0, when
    ``trainer.validation_data_dir`` is unset, or when neither tensorboard nor wandb is a logger). Call before
    ``run_ppo``: it puts the W&B run id into the Ray runtime env."""
    live = config.get("live") or {}
    dump_dir = config.trainer.get("validation_data_dir")
    loggers = list(config.trainer.logger or [])
    if int(live.get("pictures", 0)) <= 0 or not dump_dir:
        return None
    sinks = []
    if "tensorboard" in loggers:
        sinks.append(TensorBoardSink(tensorboard_dir(config)))
    if "wandb" in loggers:
        run_id = share_wandb_run(config)
        entity = os.environ.get("WANDB_ENTITY") or None
        sinks.append(WandbSink(config.trainer.project_name, config.trainer.experiment_name, run_id, entity))
    if not sinks:
        return None
    val = config.data.val_files
    return Watcher(
        dump_dir,
        sinks,
        reward_knobs(None, **dict(config.reward.custom_reward_function.reward_kwargs)),
        val_files=[val] if isinstance(val, str) else list(val),
        pictures=int(live.get("pictures", 0)),
        poll_seconds=float(live.get("poll_seconds", 10)),
    )


@contextmanager
def watching(config) -> Iterator[Watcher | None]:
    """``with watching(config): run_ppo(...)``: the watcher runs while the block does, then a final pass."""
    try:
        watcher = from_config(config)
    except Exception as err:  # noqa: BLE001 - no pictures is no reason not to train
        log(f"not watching the validation dumps: {type(err).__name__}: {err}")
        watcher = None
    if watcher is not None:
        log(f"watching {watcher.dump_dir} every {watcher.poll_seconds:g}s ({watcher.pictures} pairs per picture)")
        watcher.start()
    try:
        yield watcher
    finally:
        if watcher is not None:
            try:
                watcher.stop()
            except Exception as err:  # noqa: BLE001 - never hides how training ended
                log(f"final pass over {watcher.dump_dir} failed: {type(err).__name__}: {err}")


# ----------------------------------------------------------------------------------------------- backfill CLI


def default_pictures() -> int:
    """``live.pictures`` of dig_grpo.yaml: its one default."""
    from recipes.dig.settings import config_defaults

    return int(config_defaults()["live"]["pictures"])


def build_parser():
    parser = tool_parser(PROG, __doc__)
    parser.add_argument("--dump-dir", required=True, metavar="DIR", help="trainer.validation_data_dir of the run")
    parser.add_argument("--data", required=True, metavar="FILE", help="the run's validation parquet (the images)")
    add_model_arg(parser, purpose=", whose reward knobs re-score the answers")
    parser.add_argument("--logdir", required=True, metavar="DIR", help="TensorBoard folder to write into")
    parser.add_argument("--pictures", type=positive_int, default=default_pictures(), help="pairs per picture")
    return parser


@cli_main(PROG)
def main(argv: list[str] | None = None) -> int:
    from dig_common.models import load_model_spec

    args = build_parser().parse_args(argv)
    if not Path(args.dump_dir).is_dir():
        raise FileNotFoundError(f"--dump-dir {args.dump_dir}: no such folder (trainer.validation_data_dir)")
    require_file(args.data, "--data", "parquet file")
    spec = load_model_spec(args.model)
    check_data_model(args.data, spec, args.model)  # the answers are re-scored in the model's frame
    knobs = reward_knobs(spec)
    # its own record of the steps done, in --logdir: a rerun into the same folder adds nothing twice
    state = Path(args.logdir) / STATE_FILE
    watcher = Watcher(
        args.dump_dir, [TensorBoardSink(args.logdir)], knobs, [args.data], args.pictures, state_path=state
    )
    steps = watcher.poll(final=True)
    watcher.sinks[0].close()
    print(f"recipes.dig.live: {len(steps)} validation steps -> {args.logdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
