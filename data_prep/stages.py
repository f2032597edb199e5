"""Load and check the curriculum definition (``data_prep/stages.yaml``, docs/contracts.md, curriculum)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import yaml

from data_prep.runner import parse_k
from dig_common.yaml_error import yaml_error_line

STAGES_FILE = Path(__file__).resolve().parent / "stages.yaml"


@dataclass(frozen=True)
class Run:
    """One generator run: ``num`` pairs with ``k`` differences from base ``seed``."""

    k: str
    num: int
    seed: int
    no_diff_fraction: float
    difficulty: dict = field(default_factory=dict)  # filters on the recorded difficulty (off when empty)

    def k_values(self) -> set[int]:
        low, high = parse_k(self.k)
        values = set(range(low, high + 1))
        if self.no_diff_fraction > 0:
            values.add(0)
        return values


@dataclass(frozen=True)
class Stage:
    name: str
    description: str
    splits: dict[str, tuple[Run, ...]]

    def allowed_k(self) -> set[int]:
        """Every K a pair of this stage may have; to_verl rejects pairs outside it."""
        return set().union(*(run.k_values() for runs in self.splits.values() for run in runs))


@dataclass(frozen=True)
class Curriculum:
    max_differences: int
    render: dict
    stages: dict[str, Stage]

    def stage(self, name: str | int) -> Stage:
        key = str(name).removeprefix("stage")
        if key not in self.stages:
            raise ValueError(f"unknown stage {name!r}; stages defined: {', '.join(self.stages)}")
        return self.stages[key]

    def with_sizes(
        self, num_train: int | None = None, num_val: int | None = None, num_test: int | None = None
    ) -> Curriculum:
        """Small runs: override ``num`` per split name (``num_test`` is per run of the test split)."""
        sizes = {"train": num_train, "val": num_val, "test": num_test}
        stages = {}
        for key, stage in self.stages.items():
            splits = {
                split: tuple(replace(run, num=sizes[split]) if sizes.get(split) is not None else run for run in runs)
                for split, runs in stage.splits.items()
            }
            stages[key] = replace(stage, splits=splits)
        return replace(self, stages=stages)


def _run(raw, stage_defaults: dict, where: str, max_differences: int) -> Run:
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping {{k, num, seed}}, got {raw!r}")
    merged = {**stage_defaults, **raw}
    unknown = set(raw) - {"k", "num", "seed", "no_diff_fraction", "difficulty"}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    for key in ("k", "num", "seed"):
        if key not in merged:
            raise ValueError(f"{where}: missing {key!r}")
    low, high = parse_k(merged["k"], f"{where}: k")
    if high > max_differences:
        raise ValueError(
            f"{where}: k={merged['k']!r} asks for K outside 1..{max_differences} "
            "(K = 0 pairs come from no_diff_fraction)"
        )
    num, seed = merged["num"], merged["seed"]
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"{where}: num must be an integer >= 1 (the pairs of this run), got {num!r}")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"{where}: seed must be a non-negative integer, got {seed!r}")
    fraction = float(merged.get("no_diff_fraction", 0.0))
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"{where}: no_diff_fraction must be in [0, 1), got {fraction}")
    difficulty = check_difficulty_filters(merged.get("difficulty"), f"{where}.difficulty")
    return Run(
        k=str(merged["k"]).replace(" ", ""), num=num, seed=seed, no_diff_fraction=fraction, difficulty=difficulty
    )


def read_stages_yaml(path: Path):
    """The parsed stages file; errors name the file."""
    try:
        return yaml.safe_load(path.read_text())
    except FileNotFoundError as err:
        raise FileNotFoundError(f"stages file {path} not found: give an existing file with --stages-file") from err
    except yaml.YAMLError as err:
        raise ValueError(
            f"{path}: not valid YAML: {yaml_error_line(err)}: fix it or give another with --stages-file"
        ) from err


def load_curriculum(path: Path | str = STAGES_FILE) -> Curriculum:
    path = Path(path)
    raw = read_stages_yaml(path)
    if not isinstance(raw, dict) or not isinstance(raw.get("stages"), dict):
        raise ValueError(f"{path}: needs a 'stages:' mapping")
    max_differences = int(raw.get("max_differences", 4))
    stages = {}
    seeds: dict[int, str] = {}
    for name, body in raw["stages"].items():
        name = str(name)
        where = f"{path}: stages.{name}"
        if not isinstance(body, dict) or not isinstance(body.get("splits"), dict) or not body["splits"]:
            raise ValueError(f"{where}: needs a non-empty 'splits:' mapping")
        defaults = {key: body[key] for key in ("k", "no_diff_fraction", "difficulty") if key in body}
        splits = {}
        for split, runs in body["splits"].items():
            runs = runs if isinstance(runs, list) else [runs]
            parsed = tuple(
                _run(run, defaults, f"{where}.splits.{split}[{i}]", max_differences) for i, run in enumerate(runs)
            )
            for i, run in enumerate(parsed):
                label = f"stages.{name}.splits.{split}[{i}]"
                if run.seed in seeds:
                    raise ValueError(f"{path}: {label} reuses seed {run.seed} of {seeds[run.seed]}")
                seeds[run.seed] = label
            splits[str(split)] = parsed
        stages[name] = Stage(name=name, description=str(body.get("description", "")), splits=splits)
    return Curriculum(max_differences=max_differences, render=dict(raw.get("render") or {}), stages=stages)


# ------------------------------------------------------------------------------------- per-stage source mix

SOURCES = ("rendered", "photo")  # data_prep.render (Blender) and data_prep.photo (a COCO-format set)
RENDERED_ONLY = {"rendered": 1.0}  # the paper's curriculum: every stage without a `sources:` key


@dataclass(frozen=True)
class SourceMix:
    """Share of each pair source in a stage, and where the photo source reads its COCO-format set."""

    fractions: dict[str, float]
    coco: Path | None = None
    images: Path | None = None
    categories: tuple[str, ...] | None = None
    settings: Path | None = None

    def counts(self, num: int) -> dict[str, int]:
        """Pairs per source for a run of ``num`` pairs (photo rounded, rendered takes the rest)."""
        photo = round(num * self.fractions.get("photo", 0.0))
        return {"rendered": num - photo, "photo": photo}

    @property
    def uses_photo(self) -> bool:
        return self.fractions.get("photo", 0.0) > 0

    def describe(self) -> str:
        """E.g. ``70 % rendered, 30 % photo`` (what the build and the launch dry run print)."""
        return ", ".join(f"{100 * share:g} % {name}" for name, share in self.fractions.items() if share > 0)

    def with_paths(self, coco: Path | None, images: Path | None) -> SourceMix:
        """Command-line COCO paths override those of the stages file."""
        return replace(self, coco=Path(coco) if coco else self.coco, images=Path(images) if images else self.images)


def _source_fractions(raw, where: str) -> dict[str, float]:
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{where}: expected a mapping like {{rendered: 0.7, photo: 0.3}}, got {raw!r}")
    unknown = set(raw) - set(SOURCES)
    if unknown:
        raise ValueError(f"{where}: unknown source(s) {sorted(unknown)}; known: {', '.join(SOURCES)}")
    fractions = {}
    for name in SOURCES:
        share = raw.get(name, 0.0)
        if not isinstance(share, int | float) or isinstance(share, bool) or not 0.0 <= share <= 1.0:
            raise ValueError(f"{where}.{name}: expected a share in [0, 1], got {share!r}")
        fractions[name] = float(share)
    if abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise ValueError(f"{where}: shares sum to {sum(fractions.values()):g}, not 1")
    return fractions


def load_source_mixes(path: Path | str = STAGES_FILE) -> dict[str, SourceMix]:
    """Per stage name, its source mix: optional ``sources:`` per stage, optional top-level ``photo:`` block
    (``coco``, ``images``, ``categories``, ``settings``; relative paths are relative to the stages file)."""
    path = Path(path)
    raw = read_stages_yaml(path)
    photo = raw.get("photo") or {}
    if not isinstance(photo, dict) or set(photo) - {"coco", "images", "categories", "settings"}:
        raise ValueError(f"{path}: 'photo' must be a mapping with keys coco, images, categories, settings")

    def local(key):
        value = photo.get(key)
        return None if value in (None, "") else (path.parent / str(value))

    categories = photo.get("categories")
    if categories is not None and not (isinstance(categories, list) and all(isinstance(c, str) for c in categories)):
        raise ValueError(f"{path}: photo.categories must be a list of category names")
    mixes = {}
    for name, body in (raw.get("stages") or {}).items():
        sources = body.get("sources") if isinstance(body, dict) else None
        fractions = RENDERED_ONLY if sources is None else _source_fractions(sources, f"{path}: stages.{name}.sources")
        chosen = tuple(categories) if categories else None
        mixes[str(name)] = SourceMix(dict(fractions), local("coco"), local("images"), chosen, local("settings"))
    return mixes


# ------------------------------------------------------------------------------------ difficulty filters
# Optional per-stage filters on the difficulty fields the generator records per difference (see the dataset
# card). A candidate pair with one difference outside a bound is rejected and redrawn (reason
# "difficulty_filter"), so K and the split size are kept. A bound never applies to a field that is null for
# that difference (e.g. delta_e00 of a shape change).
DIFFICULTY_FILTERS = {
    "min_visible_px": ("visible_px", min),
    "max_visible_px": ("visible_px", max),
    "max_occluded_fraction": ("occluded_fraction", max),
    "min_changed_px": ("changed_px", min),
    "min_delta_e00": ("delta_e00", min),
    "min_box_fraction": ("box_fraction", min),
    "max_box_fraction": ("box_fraction", max),
    "min_border_px": ("border_px", min),
}


def check_difficulty_filters(filters: dict | None, where: str = "difficulty") -> dict:
    """Validated copy of a filter mapping ({} when None); ValueError naming the bad key."""
    if filters is None:
        return {}
    if not isinstance(filters, dict):
        raise ValueError(f"{where}: expected a mapping of filters, got {filters!r}")
    out = {}
    for key, value in filters.items():
        if key not in DIFFICULTY_FILTERS:
            raise ValueError(f"{where}.{key}: unknown filter (known: {', '.join(DIFFICULTY_FILTERS)})")
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ValueError(f"{where}.{key}: expected a number >= 0, got {value!r}")
        out[key] = value
    return out


def difficulty_failure(filters: dict, differences: list[dict]) -> str | None:
    """Why a pair's differences fail the filters (None if they pass)."""
    for d in differences:
        values = {**d.get("difficulty", {}), "changed_px": d.get("changed_px")}
        for key, bound in filters.items():
            field, kind = DIFFICULTY_FILTERS[key]
            value = values.get(field)
            if value is None:
                continue
            if (kind is min and value < bound) or (kind is max and value > bound):
                return f"{d['type']} of object {d['object_id']}: {field} {value} fails {key}={bound}"
    return None
