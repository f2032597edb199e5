"""The attention backend decision (recipes/dig/attention.py): every base model with and without flash-attn,
user overrides, the refusals, the interpreter probe, and the choice reaching verl 0.9.1's actor and ref models.

This machine has no flash-attn, so the with-flash-attn branch is tested through the decision function; the
without branch also runs for real: verl's config, transformers' model load.
"""

from __future__ import annotations

import copy
import importlib.util
import sys

import pytest

from dig_common.models import load_model_spec, model_names
from recipes.dig.attention import (
    ATTN_OVERRIDE_KEY,
    PACKING_NEEDS_FLASH_ATTN,
    REMOVE_PADDING_KEY,
    AttentionError,
    choose_attention,
    flash_attn_available,
    user_overrides,
)

SPECS = {name: load_model_spec(name) for name in model_names()}
QWEN25, QWEN3 = SPECS["qwen2_5_vl_7b"], SPECS["qwen3_vl_8b_thinking"]


def test_every_base_model_states_a_backend_and_both_families_are_covered():
    assert {spec.family for spec in SPECS.values()} == {"qwen2_5_vl", "qwen3_vl"}
    for spec in SPECS.values():
        if spec.model_name.startswith("tiny_"):  # the CPU rehearsal's models: sdpa, packed where verl packs on sdpa
            expected = ("sdpa", spec.family not in PACKING_NEEDS_FLASH_ATTN)
        else:
            expected = ("flash_attention_2", True)
        assert (spec.attn_implementation, spec.use_remove_padding) == expected, spec.model_name


@pytest.mark.parametrize("name", sorted(SPECS))
def test_with_flash_attn_the_model_files_own_choice(name):
    spec = SPECS[name]
    choice = choose_attention(spec, flash_attn=True)
    own = (spec.attn_implementation, spec.use_remove_padding)
    assert (choice.attn_implementation, choice.use_remove_padding) == own
    assert choice.overrides() == [f"++{ATTN_OVERRIDE_KEY}={own[0]}", f"{REMOVE_PADDING_KEY}={str(own[1]).lower()}"]
    assert "flash-attn imports" in choice.reason and name in choice.describe()


@pytest.mark.parametrize("name", sorted(SPECS))
def test_without_flash_attn_sdpa_and_remove_padding_by_family(name):
    spec = SPECS[name]
    choice = choose_attention(spec, flash_attn=False)
    packs = spec.family not in PACKING_NEEDS_FLASH_ATTN
    assert (choice.attn_implementation, choice.use_remove_padding) == ("sdpa", packs)
    assert choice.overrides() == [f"++{ATTN_OVERRIDE_KEY}=sdpa", f"{REMOVE_PADDING_KEY}={str(packs).lower()}"]
    assert "flash-attn does not import" in choice.reason
    assert ("remove-padding off" in choice.reason) == (spec.use_remove_padding and not packs)
    assert "attention: sdpa, use_remove_padding=" in choice.describe()


def test_user_overrides_win():
    eager = choose_attention(QWEN3, flash_attn=False, user_attn="eager")
    assert (eager.attn_implementation, eager.use_remove_padding) == ("eager", True)
    assert "attn_implementation=eager set by the user" in eager.reason
    padded = choose_attention(QWEN3, flash_attn=True, user_remove_padding=False)
    assert (padded.attn_implementation, padded.use_remove_padding) == ("flash_attention_2", False)
    assert "use_remove_padding=false set by the user" in padded.reason
    # with flash-attn, sdpa + packed Qwen2.5-VL runs, but verl's patched attention still uses flash-attn: say so
    sdpa = choose_attention(QWEN25, flash_attn=True, user_attn="sdpa")
    assert (sdpa.attn_implementation, sdpa.use_remove_padding) == ("sdpa", True)
    assert "runs on flash-attn whatever attn_implementation says" in sdpa.reason


@pytest.mark.parametrize("name", sorted(n for n, s in SPECS.items() if s.family in PACKING_NEEDS_FLASH_ATTN))
def test_refuses_packed_qwen2_5_vl_without_flash_attn_by_name(name):
    with pytest.raises(AttentionError) as error:
        choose_attention(SPECS[name], flash_attn=False, user_remove_padding=True)
    message = str(error.value)
    for part in (name, "qwen2_5_vl", "use_remove_padding=true", "NameError", f"{REMOVE_PADDING_KEY}=false"):
        assert part in message
    assert "bash scripts/setup_gpu.sh" in message
    assert choose_attention(SPECS[name], flash_attn=True, user_remove_padding=True).use_remove_padding


def test_refuses_what_cannot_run():
    with pytest.raises(AttentionError, match="flash_attention_2 was asked for.*bash scripts/setup_gpu.sh"):
        choose_attention(QWEN3, flash_attn=False, user_attn="flash_attention_2")
    with pytest.raises(AttentionError, match="'flash_attention_3' is not one of flash_attention_2, sdpa, eager"):
        choose_attention(QWEN3, flash_attn=True, user_attn="flash_attention_3")
    for spec in (QWEN25, QWEN3):
        with pytest.raises(AttentionError, match="ulysses_sequence_parallel_size=2 needs flash-attn.*=1"):
            choose_attention(spec, flash_attn=False, ulysses_sp_size=2)
        assert choose_attention(spec, flash_attn=True, ulysses_sp_size=2).use_remove_padding


def test_user_overrides_read_from_the_dotlist():
    assert user_overrides(["trainer.total_epochs=2"]) == (None, None)
    assert user_overrides([f"+{ATTN_OVERRIDE_KEY}=eager", f"{REMOVE_PADDING_KEY}=False"]) == ("eager", False)
    assert user_overrides([f"++{ATTN_OVERRIDE_KEY}=sdpa", f"{ATTN_OVERRIDE_KEY}='eager'"]) == ("eager", None)
    assert user_overrides([f"{REMOVE_PADDING_KEY}=true"]) == (None, True)
    assert user_overrides([f"{REMOVE_PADDING_KEY}=YES"]) == (None, True)  # the launcher's one truth table
    for word in ("maybe", "on"):
        with pytest.raises(
            AttentionError, match=f"{REMOVE_PADDING_KEY}='{word}': expected one of 1/true/yes/0/false/no"
        ):
            user_overrides([f"{REMOVE_PADDING_KEY}={word}"])


def _fake_python(path, body):
    path.write_text("#!/bin/sh\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


def test_flash_attn_available_probes_the_given_interpreter(tmp_path):
    # this interpreter has no flash-attn: the probe of a real Python says so
    assert importlib.util.find_spec("flash_attn") is None
    assert flash_attn_available(sys.executable) is False
    # an interpreter where `import flash_attn` succeeds: a stand-in that exits 0 only for exactly that probe
    yes = _fake_python(tmp_path / "python-with-fa", '[ "$1" = -c ] && [ "$2" = "import flash_attn" ]')
    assert flash_attn_available(yes) is True
    assert flash_attn_available(_fake_python(tmp_path / "python-broken-fa", "exit 1")) is False
    assert flash_attn_available(str(tmp_path / "no-such-python")) is False


@pytest.mark.verl
@pytest.mark.parametrize("model", ["qwen2_5_vl_3b", "qwen3_vl_8b_thinking"])
def test_choice_reaches_verl_actor_and_ref_models(tmp_path, model):
    """The overrides through verl's own Hydra config and HFModelConfig, then transformers' load as verl's FSDP
    engine does it (``workers/engine/fsdp/transformer_impl.py``: ``from_pretrained(config=hf_config)``)."""
    from hydra import compose, initialize_config_module
    from tiny_qwen import save_tiny_checkpoint
    from transformers import AutoModelForImageTextToText
    from verl.utils.config import omega_conf_to_dataclass

    spec = SPECS[model]
    ckpt = save_tiny_checkpoint(spec.family, tmp_path / "ckpt")
    choice = choose_attention(spec, flash_attn=False)  # sdpa: loads on any machine

    def model_config(extra):
        with initialize_config_module("verl.trainer.config", version_base=None):
            config = compose("ppo_trainer", overrides=[f"actor_rollout_ref.model.path={ckpt}", *extra])
        return omega_conf_to_dataclass(config.actor_rollout_ref.model)

    # a user's own `+...attn_implementation` first: the launcher's `++` still composes and wins
    actor = model_config([f"+{ATTN_OVERRIDE_KEY}=eager", *choice.overrides()])
    # verl's engine_workers.py gives the ref worker a deep copy of the actor's model config
    ref = copy.deepcopy(actor)
    for config in (actor, ref):
        hf = config.hf_config
        assert config.use_remove_padding is choice.use_remove_padding
        assert {
            hf._attn_implementation,
            hf.text_config._attn_implementation,
            hf.vision_config._attn_implementation,
        } == {"sdpa"}
    loaded = AutoModelForImageTextToText.from_pretrained(actor.local_path, config=actor.hf_config)
    assert {m.config._attn_implementation for m in loaded.modules() if hasattr(m, "config")} == {"sdpa"}

    # without the override verl asks for flash_attention_2, which cannot load without flash-attn: why the
    # launcher decides
    default = model_config([])
    assert default.hf_config._attn_implementation == "flash_attention_2"
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ImportError, match="FlashAttention2"):
            AutoModelForImageTextToText.from_pretrained(default.local_path, config=default.hf_config)


# One text-attention forward of each tiny model after verl's own monkey patch, in a fresh interpreter: verl
# patches the attention classes themselves, so a patched class must not leak into this test process. The two
# families patch different classes, so one interpreter serves both.
_PATCHED_FORWARD = """
import json, sys
sys.path.insert(0, sys.argv[1])
import torch
from tiny_qwen import FAMILIES, build_tiny_model
from verl.models.transformers.monkey_patch import apply_monkey_patch

outcome = {}
for family in FAMILIES:
    model = build_tiny_model(family)
    lm = model.model.language_model
    hidden = torch.randn(1, 8, lm.config.hidden_size)
    packed = torch.cat([torch.arange(4), torch.arange(4)]).view(1, 1, 8).expand(3, 1, 8)  # two packed sequences
    for remove_padding in (False, True):  # False first: it leaves the attention class unpatched
        apply_monkey_patch(model, use_remove_padding=remove_padding)
        try:
            lm.layers[0].self_attn(
                hidden_states=hidden, attention_mask=None, position_ids=packed,
                position_embeddings=lm.rotary_emb(hidden, packed),
            )
            outcome[f"{family} {remove_padding}"] = "ok"
        except Exception as error:
            outcome[f"{family} {remove_padding}"] = f"{type(error).__name__}: {error}"
print(json.dumps(outcome))
"""


@pytest.fixture(scope="module")
def patched_forward_outcome():
    import json
    import subprocess
    from pathlib import Path

    assert importlib.util.find_spec("flash_attn") is None
    tests_dir = str(Path(__file__).parent)
    result = subprocess.run(
        [sys.executable, "-c", _PATCHED_FORWARD, tests_dir], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.verl
@pytest.mark.parametrize("model", ["qwen2_5_vl_3b", "qwen3_vl_8b_thinking"])
def test_refusal_matches_what_verls_patched_attention_does_without_flash_attn(model, patched_forward_outcome):
    """The decision's premise, on verl 0.9.1 itself: packed Qwen2.5-VL attention without flash-attn raises a
    NameError; Qwen3-VL packs on sdpa; neither fails unpacked. choose_attention refuses exactly the failing case."""
    spec = SPECS[model]
    outcome = {padding: patched_forward_outcome[f"{spec.family} {padding}"] for padding in (False, True)}
    assert outcome[False] == "ok"
    for remove_padding in (False, True):
        try:
            choose_attention(spec, flash_attn=False, user_remove_padding=remove_padding)
            refused = False
        except AttentionError:
            refused = True
        assert refused == (outcome[remove_padding] != "ok"), (remove_padding, outcome)
    if spec.family in PACKING_NEEDS_FLASH_ATTN:
        assert outcome[True] == "NameError: name '_flash_use_top_left_mask' is not defined"
