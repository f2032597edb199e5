"""recipes/dig/lora.py: a LoRA run's merge becomes a plain checkpoint holding the trained policy.

The merge is written the way verl 0.9.1's model merger writes a LoRA checkpoint (its own ``save_lora_adapter`` on
the PEFT model's state dict: base weights + ``lora_adapter/``); the reference is PEFT's own merged model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from tiny_qwen import new_tiny_model, save_tiny_checkpoint
from verl.model_merger.base_model_merger import BaseModelMerger

from recipes.dig import lora
from recipes.dig.handoff import is_merged

pytestmark = pytest.mark.verl


def peft_model(family: str, base: Path, rank: int, alpha: int, seed: int):
    model = type(new_tiny_model(family)).from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear", exclude_modules=".*visual.*")
    model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:  # peft starts B at zero: give both halves values, as training would
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


def write_verl_merge(model, base: Path, out: Path, rank: int, alpha: int) -> None:
    """What ``python -m verl.model_merger merge`` leaves for a LoRA actor: verl's save_lora_adapter, then the
    remaining (base) weights saved as the HF model."""
    shutil.copytree(base, out)
    for weights in out.glob("*.safetensors"):
        weights.unlink()
    meta_dir = out.parent / f"{out.name}_actor"
    meta_dir.mkdir()
    (meta_dir / "lora_train_meta.json").write_text(json.dumps({"r": rank, "lora_alpha": alpha}))
    merger = SimpleNamespace(config=SimpleNamespace(target_dir=str(out), local_dir=str(meta_dir)))
    merger._load_lora_train_meta = lambda: BaseModelMerger._load_lora_train_meta(merger)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    assert BaseModelMerger.save_lora_adapter(merger, state)
    plain = type(model.get_base_model()).from_pretrained(base, dtype=torch.float32)
    plain.load_state_dict(state, strict=True)
    plain.save_pretrained(out)


def logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=input_ids).logits


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl"])
def test_fold_gives_the_trained_policy_as_a_plain_checkpoint(tmp_path, family):
    base = save_tiny_checkpoint(family, tmp_path / "base")
    rank, alpha = 8, 32
    trained = peft_model(family, base, rank, alpha, seed=1)
    merge = tmp_path / "merge"
    write_verl_merge(trained, base, merge, rank, alpha)
    ids = torch.randint(10, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    model_class = type(trained.get_base_model())

    unfolded = logits(model_class.from_pretrained(merge, dtype=torch.float32), ids)
    reference = logits(trained, ids)
    assert (unfolded - reference).abs().max() > 1e-2, "the adapter changes nothing: the test would prove nothing"

    record = lora.fold(merge)
    assert record == {"modules": record["modules"], "rank": rank, "alpha": alpha, "scaling": alpha / rank}
    adapted = {n for n, _ in trained.named_modules() if n.endswith("lora_A")}
    assert record["modules"] == len(adapted) > 0
    assert is_merged(merge) and (merge / lora.FOLDED).is_file()
    folded = model_class.from_pretrained(merge, dtype=torch.float32)
    assert (logits(folded, ids) - reference).abs().max() < 1e-4

    # the vision tower is untouched; every language-model linear layer with an adapter moved
    before = {k: v for f in base.glob("*.safetensors") for k, v in load_file(f).items()}
    after = {k: v for f in merge.glob("*.safetensors") for k, v in load_file(f).items()}
    assert before.keys() == after.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and not [k for k in changed if "visual" in k]
    assert len(changed) == len(adapted)


def test_fold_is_refused_twice_and_without_adapter_is_a_no_op(tmp_path):
    base = save_tiny_checkpoint("qwen3_vl", tmp_path / "base")
    assert lora.fold(base) is None  # a full fine-tuning merge: nothing to fold
    trained = peft_model("qwen3_vl", base, 8, 16, seed=2)
    merge = tmp_path / "merge"
    write_verl_merge(trained, base, merge, 8, 16)
    lora.fold(merge)
    with pytest.raises(lora.LoraError, match="already folded"):
        lora.fold(merge)


def test_scaling_and_broken_adapters():
    assert lora.scaling({"r": 8, "lora_alpha": 16}) == 2.0
    assert lora.scaling({"r": 16, "lora_alpha": 16, "use_rslora": True}) == 4.0
    with pytest.raises(lora.LoraError, match="lora_alpha"):
        lora.scaling({"r": 8, "lora_alpha": 0})
    a = torch.zeros(2, 4)
    with pytest.raises(lora.LoraError, match="alone"):
        lora.adapter_pairs({"base_model.model.x.q_proj.lora_A.weight": a})
    with pytest.raises(lora.LoraError, match="not a lora_A"):
        lora.adapter_pairs({"base_model.model.x.q_proj.weight": a})
    pairs = lora.adapter_pairs(
        {"base_model.model.x.q_proj.lora_A.weight": a, "base_model.model.x.q_proj.lora_B.weight": a.T}
    )
    assert list(pairs) == ["x.q_proj"]
