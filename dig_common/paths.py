"""Where the shared data files are. The base-model files and the prompt templates are read by data_prep, eval and
the recipe alike, so they live here, at the bottom layer, as package data of ``dig_common``: ``base_model/`` (also
the recipe's Hydra config group ``base_model``, found through ``hydra.searchpath: pkg://dig_common``) and
``prompt_templates/``. Paths come from this file's location, so an installed copy works as well as a checkout."""

from __future__ import annotations

from pathlib import Path

DATA_ROOT = Path(__file__).resolve().parent
BASE_MODEL_DIR = DATA_ROOT / "base_model"
PROMPT_DIR = DATA_ROOT / "prompt_templates"
