"""The DiG prompt for a base model, rendered from the template files in ``dig_common/prompt_templates/``.

Templates are data: ``<prompt_variant>.txt`` (``instruct`` / ``thinking``) holds the instruction with a
``$coordinate_frame`` slot, filled from ``coords/<coord_mode>.txt``; ``system.txt`` is the optional default system
prompt. data_prep writes the result into the parquet (docs/contracts.md, parquet row) and eval imports the same functions, so training
and evaluation ask the same question.
"""

from __future__ import annotations

from pathlib import Path
from string import Template
from typing import TYPE_CHECKING

from dig_common.paths import PROMPT_DIR

if TYPE_CHECKING:
    from dig_common.models import ModelSpec

IMAGE_PLACEHOLDER = "<image>"
# Use the default system prompt file (dig_common/prompt_templates/system.txt) rather than a literal text.
DEFAULT_SYSTEM = "default"


def _read_template(path: Path, what: str) -> str:
    if not path.is_file():
        choices = sorted(p.stem for p in path.parent.glob("*.txt") if p.stem != "system")
        raise ValueError(f"no {what} template {path}; available: {', '.join(choices) or 'none'}")
    return path.read_text(encoding="utf-8").strip()


def coordinate_frame(spec: ModelSpec, prompt_dir: Path = PROMPT_DIR) -> str:
    """The sentence that tells the model its box frame (``coords/<coord_mode>.txt``); eval.refcoco asks with it too."""
    return _read_template(prompt_dir / "coords" / f"{spec.coord_mode}.txt", "coord_mode")


def build_instruction(spec: ModelSpec, prompt_dir: Path = PROMPT_DIR) -> str:
    """The user instruction text (no image placeholders) for the model's prompt variant and coordinate frame."""
    template = Template(_read_template(prompt_dir / f"{spec.prompt_variant}.txt", "prompt_variant"))
    frame = coordinate_frame(spec, prompt_dir)
    try:
        return template.substitute(coordinate_frame=frame)
    except (KeyError, ValueError) as err:
        raise ValueError(f"{prompt_dir / (spec.prompt_variant + '.txt')}: bad template placeholder: {err}") from err


def resolve_system_prompt(system_prompt: str | None, prompt_dir: Path = PROMPT_DIR) -> str | None:
    """None -> no system message; ``"default"`` -> ``system.txt``; anything else is the literal text."""
    if system_prompt is None:
        return None
    if system_prompt == DEFAULT_SYSTEM:
        return _read_template(prompt_dir / "system.txt", "system prompt")
    if not system_prompt.strip():
        raise ValueError("system prompt is empty; pass None for no system message")
    return system_prompt


def build_prompt(spec: ModelSpec, system_prompt: str | None = None, prompt_dir: Path = PROMPT_DIR) -> list[dict]:
    """verl chat messages (docs/contracts.md, parquet row): ``[system?, {"role": "user", "content": "<image><image>" + instruction}]``.

    Image A is the first ``<image>``, B the second; verl pairs them positionally with the row's ``images`` list.
    """
    messages = []
    system_text = resolve_system_prompt(system_prompt, prompt_dir)
    if system_text is not None:
        messages.append({"role": "system", "content": system_text})
    content = IMAGE_PLACEHOLDER * 2 + build_instruction(spec, prompt_dir)
    messages.append({"role": "user", "content": content})
    return messages


def build_vision_messages(
    spec: ModelSpec, image_a, image_b, system_prompt: str | None = None, prompt_dir: Path = PROMPT_DIR
) -> list[dict]:
    """The same prompt as content-list messages for HF processors / qwen_vl_utils (what verl builds from a row).

    ``image_a``/``image_b``: PIL images or paths. Each image item carries the model's min/max_pixels, as in the
    parquet, so ``qwen_vl_utils.process_vision_info`` resizes exactly as in training.
    """
    messages = []
    for message in build_prompt(spec, system_prompt, prompt_dir):
        if IMAGE_PLACEHOLDER not in message["content"]:
            messages.append({"role": message["role"], "content": [{"type": "text", "text": message["content"]}]})
            continue
        instruction = message["content"].replace(IMAGE_PLACEHOLDER, "")
        content = [
            {"type": "image", "image": image, "min_pixels": spec.min_pixels, "max_pixels": spec.max_pixels}
            for image in (image_a, image_b)
        ]
        content.append({"type": "text", "text": instruction})
        messages.append({"role": message["role"], "content": content})
    return messages
