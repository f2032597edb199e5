"""Tiny, offline Qwen2.5-VL / Qwen3-VL tokenizer, processor and model: the test fixtures and the CPU rehearsal's
policies (``python -m recipes.dig.rehearsal.tiny_models``, see ``recipes.dig.rehearsal.warm_start``).

Everything is built from configs in a few hundred milliseconds; nothing is downloaded (the module sets
``HF_HUB_OFFLINE=1`` on import). The objects are the *real* transformers classes, with the real Qwen special
tokens (same names, same relative order, same special/non-special flags) and the real chat templates, so
verl's ``RLHFDataset``, ``qwen_vl_utils`` and HF ``generate`` exercise their real code paths. Only the
vocabulary is tiny: a byte-level BPE (256 byte symbols + a few hundred merges trained on a fixed corpus)
that round-trips any text, followed by the Qwen special tokens.

Families (the ``dig.family`` values of ``dig_common/base_model/*.yaml``):

=============  =====================================  ==========  =====  ======================
family         processor / model class                image proc  patch  smart_resize factor
=============  =====================================  ==========  =====  ======================
``qwen2_5_vl``  Qwen2_5_VLProcessor / Qwen2_5_VLFor...  Qwen2VL     14     28
``qwen3_vl``    Qwen3VLProcessor / Qwen3VLFor...        Qwen2VL     16     32 (+ Qwen3VLVideoProcessor)
=============  =====================================  ==========  =====  ======================

``variant`` picks the chat template: ``"instruct"`` (Qwen2.5-VL-Instruct, Qwen3-VL-*-Instruct) or
``"thinking"`` (Qwen3-VL-*-Thinking: the generation prompt ends in ``<think>\\n``). Default: ``"thinking"``
for qwen3_vl (the recipe's default model), ``"instruct"`` for qwen2_5_vl (it has no thinking variant).

Usage::

    from recipes.dig.rehearsal.tiny_models import build_tiny_tokenizer, build_tiny_processor, build_tiny_model
    # tests import the same names through tests/tiny_qwen.py (bare name: pytest puts tests/ on sys.path; NOT
    # `from tests.tiny_qwen ...`: the verl and transferqueue wheels install a top-level `tests` package).

    tok = build_tiny_tokenizer("qwen3_vl")                    # Qwen2TokenizerFast, cached per process
    proc = build_tiny_processor("qwen3_vl", min_pixels=32 * 32 * 4, max_pixels=32 * 32 * 256)
    model = build_tiny_model("qwen3_vl")                      # random weights, eval mode, CPU, seed 0
    ckpt = save_tiny_checkpoint("qwen3_vl", tmp_path / "ckpt")  # config + safetensors + processor + tokenizer
    # AutoProcessor.from_pretrained(ckpt) / AutoModelForImageTextToText.from_pretrained(ckpt) work offline.

Cached objects are shared: do not mutate them (``copy.deepcopy`` first if you must).

Pixel bounds: images are resized twice on the verl path, first by ``qwen_vl_utils.fetch_image`` (per-image
``min_pixels``/``max_pixels`` from the parquet) and then again by the HF image processor with ITS OWN bounds.
The fixture's processor defaults to (1 token, 16384 tokens) x factor^2, so it is a no-op on any image
fetch_image produced and token counts equal ``smart_resize``'s prediction. The real checkpoints' processor
bounds are in ``REAL_PROCESSOR_PIXEL_BOUNDS``: the real Qwen3-VL processor's min is 65536 px, so it upscales any
image fetch_image shrank below 64 tokens (e.g. a 64x64 test image becomes 256x256). To test with the real
behaviour: ``lo, hi = REAL_PROCESSOR_PIXEL_BOUNDS[family]; build_tiny_processor(family, min_pixels=lo, max_pixels=hi)``.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from dig_common.argtypes import positive_int
from dig_common.cli import CliError, cli_main, tool_parser

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FAMILIES = ("qwen2_5_vl", "qwen3_vl")
VARIANTS = ("instruct", "thinking")

# Patch size of the vision tower; smart_resize factor = patch * SPATIAL_MERGE.
PATCH_SIZE = {"qwen2_5_vl": 14, "qwen3_vl": 16}
SPATIAL_MERGE = 2
TEMPORAL_PATCH = 2


def resize_factor(family: str) -> int:
    """smart_resize factor of ``family``: 28 for qwen2_5_vl, 32 for qwen3_vl."""
    return PATCH_SIZE[_check_family(family)] * SPATIAL_MERGE


def default_pixel_bounds(family: str) -> tuple[int, int]:
    """The fixture processor's default (min_pixels, max_pixels): 1 and 16384 tokens x factor^2.

    The min is the smallest smart_resize can return, so the processor never re-resizes an image that
    qwen_vl_utils.fetch_image already resized; the max is qwen_vl_utils' own default max.
    """
    factor = resize_factor(family)
    return factor * factor, 16384 * factor * factor


# (min_pixels, max_pixels) of the real checkpoints' image processors (preprocessor_config.json "size").
REAL_PROCESSOR_PIXEL_BOUNDS = {
    "qwen2_5_vl": (3136, 12845056),  # Qwen2.5-VL-*-Instruct: 56*56, 28*28*16384
    "qwen3_vl": (65536, 16777216),  # Qwen3-VL-*: shortest_edge 256*256, longest_edge 4096*4096
}


# Added tokens in the real checkpoints' id order (Qwen2.5-VL: 151643..151664; Qwen3-VL adds
# 151665..151668). The flag says whether the token is "special" (skipped by decode(skip_special_tokens=True)):
# <tool_call>, <think> etc. are added but NOT special in the real tokenizers.
_QWEN2_5_ADDED_TOKENS = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
_QWEN3_EXTRA_ADDED_TOKENS = (
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
ADDED_TOKENS = {
    "qwen2_5_vl": _QWEN2_5_ADDED_TOKENS,
    "qwen3_vl": _QWEN2_5_ADDED_TOKENS + _QWEN3_EXTRA_ADDED_TOKENS,
}

# The official chat templates (chat_template.json of Qwen/Qwen2.5-VL-7B-Instruct, Qwen/Qwen3-VL-8B-Instruct and
# Qwen/Qwen3-VL-8B-Thinking), copied into recipes/dig/rehearsal/chat_templates/ (no hub access); read byte for byte
# (the Qwen2.5-VL one has no final newline). tests/test_tiny_qwen.py pins their output.
CHAT_TEMPLATE_DIR = Path(__file__).resolve().parent / "chat_templates"
QWEN2_5_VL_CHAT_TEMPLATE = (CHAT_TEMPLATE_DIR / "qwen2_5_vl_instruct.jinja").read_text(encoding="utf-8")
QWEN3_VL_INSTRUCT_CHAT_TEMPLATE = (CHAT_TEMPLATE_DIR / "qwen3_vl_instruct.jinja").read_text(encoding="utf-8")
QWEN3_VL_THINKING_CHAT_TEMPLATE = (CHAT_TEMPLATE_DIR / "qwen3_vl_thinking.jinja").read_text(encoding="utf-8")

CHAT_TEMPLATES = {
    ("qwen2_5_vl", "instruct"): QWEN2_5_VL_CHAT_TEMPLATE,
    ("qwen3_vl", "instruct"): QWEN3_VL_INSTRUCT_CHAT_TEMPLATE,
    ("qwen3_vl", "thinking"): QWEN3_VL_THINKING_CHAT_TEMPLATE,
}

# Fixed corpus the tiny BPE merges are trained on: chat scaffolding and DiG-style JSON answers, so prompts
# and answers stay short-ish in tokens. Any text still encodes (byte fallback is inherent to byte-level BPE).
_BPE_CORPUS = (
    "You are a helpful assistant.",
    "system user assistant The two images differ. Find every difference between the two images.",
    "Output the bounding boxes of all differences as JSON: a list of [x0, y0, x1, y1] in pixels.",
    '[{"bbox_2d": [12, 34, 567, 890], "label": "difference"}, {"bbox_2d": [0, 0, 1000, 1000]}]',
    '```json\n[\n  {"bbox_2d": [101, 202, 303, 404]}\n]\n``` <think> Let me compare the images. </think>',
    "0123456789 10 20 30 40 50 60 70 80 90 100 200 300 400 500 600 700 800 900 1000 , . : ; ( ) { } [ ]",
)
_BPE_VOCAB_SIZE = 512  # 256 byte symbols + up to 256 merges


def _check_family(family: str) -> str:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    return family


def _resolve_variant(family: str, variant: str | None) -> str:
    _check_family(family)
    if variant is None:
        return "thinking" if family == "qwen3_vl" else "instruct"
    if (family, variant) not in CHAT_TEMPLATES:
        allowed = sorted(v for f, v in CHAT_TEMPLATES if f == family)
        raise ValueError(f"family {family!r} has no variant {variant!r}; expected one of {allowed}")
    return variant


def _require_qwen3_vl():
    """Import the Qwen3-VL classes, with a clear error on a transformers that lacks them."""
    try:
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
        from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    except ImportError as error:  # transformers < 4.57 has no Qwen3-VL
        import transformers

        raise RuntimeError(
            f"family 'qwen3_vl' needs transformers with Qwen3-VL classes (>= 4.57); installed: "
            f"{transformers.__version__} ({error})"
        ) from error
    return Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor, Qwen3VLVideoProcessor


@functools.lru_cache(maxsize=1)
def _trained_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocab + merges trained (deterministically) on the fixed corpus with Qwen2's pre-tokenizer."""
    import json

    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
        min_frequency=1,
    )
    bpe.train_from_iterator(_BPE_CORPUS, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


@functools.cache
def build_tiny_tokenizer(family: str, variant: str | None = None):
    """A ``Qwen2TokenizerFast`` with a tiny byte-level BPE, the family's real added tokens and chat template.

    Ids: BPE symbols first (0..~511), then the added tokens in the real order, so ``len(tokenizer)`` is ~535.
    eos = ``<|im_end|>``, pad = ``<|endoftext|>``, no bos (as in the real Qwen-VL tokenizers).
    """
    from tokenizers import AddedToken
    from transformers import Qwen2TokenizerFast

    variant = _resolve_variant(family, variant)
    vocab, merges = _trained_bpe()
    added = ADDED_TOKENS[family]
    special = [token for token, is_special in added if is_special]
    # The added tokens get fixed ids right after the BPE symbols, in the real order; registering them below
    # then reuses those ids (this keeps relative ids equal to the real checkpoints' 151643.. block).
    vocab = dict(vocab)
    for token, _ in added:
        vocab[token] = len(vocab)
    tokenizer = Qwen2TokenizerFast(
        vocab=vocab,
        merges=list(merges),
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[t for t in special if t not in ("<|im_end|>", "<|endoftext|>")],
        errors="replace",
        model_max_length=131072,
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATES[(family, variant)],
    )
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t, is_special in added if not is_special])
    actual = tokenizer.convert_tokens_to_ids([token for token, _ in added])
    if actual != [vocab[token] for token, _ in added] or len(tokenizer) != len(vocab):
        raise AssertionError(f"added token ids moved: {actual}, len {len(tokenizer)} != {len(vocab)}")
    return tokenizer


def build_tiny_processor(
    family: str,
    variant: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    save_dir: str | os.PathLike | None = None,
):
    """The family's real processor (tiny tokenizer inside), pixel bounds settable; optionally saved to ``save_dir``.

    qwen2_5_vl -> ``Qwen2_5_VLProcessor(Qwen2VLImageProcessor(patch 14, merge 2), Qwen2VLVideoProcessor)``;
    qwen3_vl -> ``Qwen3VLProcessor(Qwen2VLImageProcessor(patch 16, merge 2), Qwen3VLVideoProcessor)``.
    Mean/std are the real checkpoints' (CLIP for Qwen2.5-VL, 0.5 for Qwen3-VL). ``min_pixels``/``max_pixels``
    default to :func:`default_pixel_bounds`. The processor is cached per (family, variant, bounds); with
    ``save_dir`` it is also written with ``save_pretrained`` (``AutoProcessor.from_pretrained(save_dir)`` then
    works offline).
    """
    variant = _resolve_variant(family, variant)
    default_min, default_max = default_pixel_bounds(family)
    min_pixels = default_min if min_pixels is None else int(min_pixels)
    max_pixels = default_max if max_pixels is None else int(max_pixels)
    if not 0 < min_pixels <= max_pixels:
        raise ValueError(f"need 0 < min_pixels <= max_pixels, got min_pixels={min_pixels} max_pixels={max_pixels}")
    processor = _cached_processor(family, variant, min_pixels, max_pixels)
    if save_dir is not None:
        processor.save_pretrained(os.fspath(save_dir))
    return processor


@functools.cache
def _cached_processor(family: str, variant: str, min_pixels: int, max_pixels: int):
    from transformers import Qwen2VLImageProcessor

    tokenizer = build_tiny_tokenizer(family, variant)
    patch = PATCH_SIZE[family]
    vision_kwargs = dict(
        size={"shortest_edge": min_pixels, "longest_edge": max_pixels},
        patch_size=patch,
        temporal_patch_size=TEMPORAL_PATCH,
        merge_size=SPATIAL_MERGE,
    )
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLProcessor
        from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

        clip_mean, clip_std = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
        image_processor = Qwen2VLImageProcessor(image_mean=clip_mean, image_std=clip_std, **vision_kwargs)
        video_processor = Qwen2VLVideoProcessor(image_mean=clip_mean, image_std=clip_std, **vision_kwargs)
        processor_class = Qwen2_5_VLProcessor
    else:
        _, _, processor_class, video_processor_class = _require_qwen3_vl()
        half = [0.5, 0.5, 0.5]
        image_processor = Qwen2VLImageProcessor(image_mean=half, image_std=half, **vision_kwargs)
        video_processor = video_processor_class(image_mean=half, image_std=half, **vision_kwargs)
    processor = processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=tokenizer.chat_template,
    )
    return processor


# Tiny sizes. head_dim 32: the smallest head size vLLM's CPU attention accepts (32, 64, 80, 96, 112, 128, ...;
# 16 fails with "Unsupported CPU attention configuration"), so vLLM can serve these checkpoints on CPU. The mrope
# sections (temporal, height, width) must sum to head_dim / 2 = 16.
TEXT_HEAD_DIM = 32
_TEXT_SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=TEXT_HEAD_DIM,
    max_position_embeddings=4096,
    rms_norm_eps=1e-6,
)
_MROPE_SECTION = [4, 6, 6]
_VISION_SIZES = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3)


def tiny_model_config(family: str, variant: str | None = None):
    """The ``Qwen2_5_VLConfig`` / ``Qwen3VLConfig`` of the tiny model; vocab and special ids from the tokenizer."""
    variant = _resolve_variant(family, variant)
    tokenizer = build_tiny_tokenizer(family, variant)
    ids = dict(
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
    )
    text = dict(
        _TEXT_SIZES,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision = dict(
        _VISION_SIZES,
        patch_size=PATCH_SIZE[family],
        spatial_merge_size=SPATIAL_MERGE,
        temporal_patch_size=TEMPORAL_PATCH,
        out_hidden_size=_TEXT_SIZES["hidden_size"],
    )
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        text["rope_parameters"] = {"rope_type": "default", "mrope_section": _MROPE_SECTION, "rope_theta": 1e6}
        # window_size must be a multiple of patch * merge; one full-attention block (index 0) as in the real tower.
        vision.update(window_size=112, fullatt_block_indexes=[0], tokens_per_second=2)
        # `architectures` as in every hub config: verl's model merger picks the class from it
        return Qwen2_5_VLConfig(
            text_config=text, vision_config=vision, architectures=["Qwen2_5_VLForConditionalGeneration"], **ids
        )
    config_class, _, _, _ = _require_qwen3_vl()
    text["rope_parameters"] = {
        "rope_type": "default",
        "mrope_section": _MROPE_SECTION,
        "mrope_interleaved": True,
        "rope_theta": 5e6,
    }
    vision.update(hidden_act="gelu_pytorch_tanh", num_position_embeddings=256, deepstack_visual_indexes=[0])
    return config_class(
        text_config=text, vision_config=vision, architectures=["Qwen3VLForConditionalGeneration"], **ids
    )


def build_tiny_model(
    family: str,
    variant: str | None = None,
    save_dir: str | os.PathLike | None = None,
    seed: int = 0,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
):
    """A random tiny ``Qwen2_5_VLForConditionalGeneration`` / ``Qwen3VLForConditionalGeneration`` (float32, CPU, eval).

    ~0.2 M parameters (text: hidden 64, 2 layers, 2 heads x 32 / 1 kv head; vision: depth 1, hidden 32), vocab =
    ``len(build_tiny_tokenizer(family))``, special token ids from the tokenizer. Weights are a deterministic
    function of ``seed``; the model is cached per (family, variant, seed). ``generation_config`` stops on
    ``<|im_end|>`` or ``<|endoftext|>``, pads with ``<|endoftext|>`` and is greedy. With ``save_dir`` a complete
    checkpoint (model + processor with ``min_pixels``/``max_pixels`` + tokenizer) is written there too, see
    :func:`save_tiny_checkpoint`.
    """
    variant = _resolve_variant(family, variant)
    model = _cached_model(family, variant, seed)
    if save_dir is not None:
        save_tiny_checkpoint(family, save_dir, variant, min_pixels, max_pixels, seed)
    return model


@functools.cache
def _cached_model(family: str, variant: str, seed: int):
    return new_tiny_model(family, variant, seed).eval()


def new_tiny_model(family: str, variant: str | None = None, seed: int = 0):
    """A fresh (uncached, so trainable) random tiny model: weights a deterministic function of ``seed``."""
    import torch
    from transformers import GenerationConfig

    variant = _resolve_variant(family, variant)
    config = tiny_model_config(family, variant)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLForConditionalGeneration as model_class
    else:
        _, model_class, _, _ = _require_qwen3_vl()
    tokenizer = build_tiny_tokenizer(family, variant)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=tokenizer.pad_token_id,
        do_sample=False,
    )
    return model


def save_tiny_checkpoint(
    family: str,
    save_dir: str | os.PathLike,
    variant: str | None = None,
    min_pixels: int | None = None,
    max_pixels: int | None = None,
    seed: int = 0,
) -> Path:
    """Write a complete HF checkpoint dir (config, safetensors, generation config, processor, tokenizer).

    Loadable offline by ``AutoModelForImageTextToText`` / ``AutoProcessor`` / ``AutoTokenizer``. Returns the path.
    """
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    _cached_model(family, _resolve_variant(family, variant), seed).save_pretrained(save_dir)
    processor = build_tiny_processor(family, variant, min_pixels, max_pixels)
    processor.save_pretrained(save_dir)
    return save_dir


def verl_data_config(family: str, **overrides):
    """verl 0.9.1's ``data`` config (``trainer/config/data/legacy_data.yaml`` defaults) for ``RLHFDataset``.

    Defaults for tests: ``image_patch_size`` = the family's patch, ``filter_overlong_prompts=True`` and
    ``filter_overlong_prompts_workers=None``. The last one matters: ``datasets`` forks a worker pool even for
    ``num_proc=1``, and a forked child that runs torch ops after the parent already used torch's thread pool
    (any earlier model/processor call in the same pytest process) deadlocks. ``None`` filters in-process.
    ``overrides`` (e.g. ``max_prompt_length=...``, ``cache_dir=str(tmp_path)``) win.
    """
    import verl
    from omegaconf import OmegaConf

    defaults = OmegaConf.load(Path(verl.__file__).parent / "trainer" / "config" / "data" / "legacy_data.yaml")
    test_defaults = {
        "image_patch_size": PATCH_SIZE[_check_family(family)],
        "filter_overlong_prompts": True,
        "filter_overlong_prompts_workers": None,
        "dataloader_num_workers": 0,
    }
    return OmegaConf.merge(defaults, test_defaults, overrides)


# ---------------------------------------------------------------------------------------------------------------
# The CPU rehearsal's policies: `python -m recipes.dig.rehearsal.tiny_models --model NAME --out DIR [--data PARQUET]`

PROG = "python -m recipes.dig.rehearsal.tiny_models"
BUILD_RECORD = "tiny_build.json"  # what a checkpoint folder was built from; a rerun with the same settings skips


def _file_sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_record(spec, seed: int, data: Path | None, steps: int) -> dict:
    """The settings a checkpoint is a deterministic function of (the data by content, not by name)."""
    return {
        "model": spec.model_name,
        "family": spec.family,
        "variant": spec.prompt_variant,
        "min_pixels": spec.min_pixels,
        "max_pixels": spec.max_pixels,
        "seed": seed,
        "data_sha256": _file_sha256(data) if data is not None else None,
        "steps": steps if data is not None else 0,
    }


def check_build_inputs(out: Path, data: Path | None) -> None:
    """Bad input, found before any work: a --data that is not a file, an --out that is a file."""
    if data is not None and not data.is_file():
        raise FileNotFoundError(
            f"--data {data}: no such file (give a parquet written by data_prep.to_verl / data_prep.build)"
        )
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} is a file: give a folder for the checkpoint")


def build_checkpoint(spec, out: Path, seed: int = 0, data: Path | None = None, steps: int | None = None) -> dict:
    """Write the tiny checkpoint of base-model file ``spec`` into ``out`` (config, safetensors, generation config,
    processor with the file's pixel bounds, tokenizer, ``tiny_build.json``), warm-started on ``data`` if given.

    The folder appears whole or not at all (built under a temporary name, then renamed). An ``out`` already built
    with the same settings is kept (``"status": "up to date"``); one built otherwise, or any other non-empty folder,
    is refused: the caller deletes it or picks another ``out``.
    """
    import shutil

    from dig_common.fileio import temp_path

    out, data = Path(out), None if data is None else Path(data)
    check_build_inputs(out, data)
    variant = _resolve_variant(spec.family, spec.prompt_variant)
    if steps is None:
        from recipes.dig.rehearsal.warm_start import DEFAULT_STEPS

        steps = DEFAULT_STEPS
    record = build_record(spec, seed, data, steps)
    if out.is_dir() and any(out.iterdir()):
        try:
            existing = json.loads((out / BUILD_RECORD).read_text())
        except (OSError, ValueError):
            existing = None
        if existing == record:
            return {"status": "up to date", "out": str(out), **record}
        what = "a tiny checkpoint built with other settings" if existing else "files that are not a tiny checkpoint"
        raise CliError(f"--out {out} already holds {what}: delete it or choose another --out")
    result = {"status": "built", "out": str(out), **record}
    tmp = temp_path(out)
    try:
        model = new_tiny_model(spec.family, variant, seed)
        processor = build_tiny_processor(spec.family, variant, spec.min_pixels, spec.max_pixels)
        if data is not None:
            from recipes.dig.rehearsal.warm_start import warm_start

            result["warm_start"] = warm_start(model, processor, spec, data, steps, seed)
        model.eval().save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / BUILD_RECORD).write_text(json.dumps(record, indent=1) + "\n")
        if out.is_dir():
            out.rmdir()  # empty (checked above): the rename needs the name free
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return result


_CLI_DOC = """Build a tiny Qwen-VL checkpoint for the CPU rehearsal offline from configs, seeded, and optionally warm-start
it on the ground-truth answers of a rehearsal parquet.

Prints one JSON line: the settings, and with --data the warm start's rows, steps, answer loss before/after and
seconds. A rerun with the same settings keeps the folder."""


@cli_main(PROG)
def main(argv: list[str] | None = None) -> int:
    from dig_common.models import load_model_spec

    parser = tool_parser(PROG, _CLI_DOC)
    parser.add_argument("--model", required=True, help="a tiny base-model file: NAME (tiny_qwen2_5_vl, ...) or YAML")
    parser.add_argument("--out", type=Path, required=True, help="checkpoint folder to write")
    parser.add_argument("--data", type=Path, default=None, help="parquet to warm-start on (data_prep.to_verl rows)")
    parser.add_argument("--steps", type=positive_int, default=None, help="warm-start steps (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and warm-start order")
    args = parser.parse_args(argv)
    spec = load_model_spec(args.model)
    _resolve_variant(spec.family, spec.prompt_variant)
    print(json.dumps(build_checkpoint(spec, args.out, args.seed, args.data, args.steps)))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
