"""Where the recipe's data files are. The base-model files (a Hydra config group) and the prompt templates belong
to the recipe and are installed as package data of ``recipes.dig``; every other part finds them through this
module, by package, so an installed copy works as well as a checkout."""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

RECIPE_DIR = Path(str(files("recipes.dig")))
BASE_MODEL_DIR = RECIPE_DIR / "config" / "base_model"
PROMPT_DIR = RECIPE_DIR / "prompts"
