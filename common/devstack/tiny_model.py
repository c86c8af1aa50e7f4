"""A tiny random-weight Ideogram 4, built locally with the real component classes.

Tests, CPU-only development machines and CI run the real `Ideogram4Pipeline` code path (the same loader that loads
the Hub weights) on this model: a Qwen3-VL text encoder with the full 36 decoder layers (the pipeline taps 13 of
them), two `Ideogram4Transformer2DModel`s, a Flux2 VAE and the flow-matching scheduler, all shrunk to a few hundred
kilobytes. The tokenizer is a byte-level BPE like Qwen's, so any prompt or JSON caption tokenizes without `<unk>`.

The result is saved with `Ideogram4Pipeline.save_pretrained` in diffusers format (float32) and loads back with
`Ideogram4Pipeline.from_pretrained(path)`, exactly like a downloaded checkpoint. Image sides must be multiples of
16 (VAE factor 8 x patch 2), as for the real model.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from common.settings import Settings

log = logging.getLogger(__name__)
TINY_MARKER = "letterpress_tiny.json"
# What the builder makes: 2 added the prompt enhancer head (magic prompt). An older tiny model in the default place
# is rebuilt when a worker starts (ensure_default_tiny_model); one a setting names is used as it is.
TINY_VERSION = 2

# Tokens of the Qwen chat format; `<|endoftext|>` doubles as the pad token, as in Qwen's own tokenizer.
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Qwen-style chat template; accepts string content or the list-of-parts content the pipeline sends.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Training text for the tiny BPE: the words and punctuation our prompts and JSON captions are made of, so common
# words become single tokens. Anything else still tokenizes byte by byte (byte-level alphabet), never to <unk>.
_CORPUS = """
A photo of a cat holding a sign that says hello world. A coffee mug with the text 'Monday' printed in bold serif
on white ceramic, on a wood table, studio light, soft shadow, product photo. Poster for a summer sale: 50% off,
bold red banner, logo in the corner. Neon sign reading OPEN 24/7 in a rainy city street at night, reflections in
the window. Menu board of a small cafe with prices 1 2 3 4 5 6 7 8 9 0 $4.50 and chalk lettering.
{"high_level_description": "a vintage travel poster", "compositional_deconstruction": {"background": "a blue sky
over green hills", "elements": [{"type": "obj", "desc": "a red train"}, {"type": "text", "text": "VISIT THE ALPS",
"desc": "large yellow sans-serif title at the top"}]}}
The quick brown fox jumps over the lazy dog. THE QUICK BROWN FOX JUMPS OVER THE LAZY DOG. abcdefghijklmnopqrstuvwxyz
ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 . , ; : ! ? ' " ( ) [ ] { } < > / \\ | - _ + = * & ^ % $ # @ ~ `
illustration, typography, flat vector, watercolor, 3d render, cinematic lighting, portrait, landscape, minimal,
label, product, shelf, packaging, book cover, album art, t-shirt, sticker, greeting card, infographic, chart, map.
"""

# Tiny sizes. Text hidden 32 x 13 tapped layers = 416 features a token (53,248 in the real model).
_TEXT_HIDDEN = 32
_TEXT_LAYERS = 36  # the pipeline taps decoder layers 0, 3, ..., 33, 35: all 36 must exist
_TOKENIZER_VOCAB = 1024
_VAE_LATENT_CHANNELS = 4  # x 2x2 patch = 16 transformer input channels


def build_tiny_model(path: str | Path, seed: int = 0, *, distilled: bool = False) -> Path:
    """Build and save a tiny random-weight Ideogram 4 at `path`; same seed, same weights. Returns the path.

    `distilled`: saved without the `unconditional_transformer`, as a CFG-free distilled checkpoint ships (its
    `model_index.json` does not name one); it runs the CFG-free presets only.

    The checkpoint is written to a sibling temporary directory and renamed into place, so a concurrent builder
    (two workers starting on one machine) or a crash never leaves a half-written model at `path`.
    """
    from diffusers import Ideogram4Pipeline

    path = Path(path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.building-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        components = _build_components(seed)
        if distilled:
            components["unconditional_transformer"] = None
        pipe = Ideogram4Pipeline(tokenizer=_build_tokenizer(), **components)
        pipe.save_pretrained(staging, safe_serialization=True)
        if distilled:  # not even a null entry: the component is absent
            index = json.loads((staging / "model_index.json").read_text())
            index.pop("unconditional_transformer", None)
            (staging / "model_index.json").write_text(json.dumps(index, indent=2))
        (staging / TINY_MARKER).write_text(json.dumps({"tiny": True, "seed": seed, "version": TINY_VERSION}))
        _move_into_place(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def ensure_default_tiny_model(settings: Settings, *, cpu_only: bool = False) -> Path | None:
    """Before a worker starts (`letterpress worker`, `letterpress up`): with no model configured and no GPU, the
    worker serves the tiny model at `settings.tiny_model_dir`; build it there if it is missing. Returns its path,
    or None when the worker will load something else."""
    if settings.model.id or (not cpu_only and torch.cuda.is_available()):
        return None
    path = settings.tiny_model_dir
    if not (path / "model_index.json").is_file():
        log.info("no model configured and no GPU: building the tiny random-weight model at %s", path)
        build_tiny_model(path)
    elif is_tiny_model(path) and _built_version(path) < TINY_VERSION:
        log.info("the tiny model at %s predates this version's (no prompt enhancer head): rebuilding it", path)
        build_tiny_model(path)
    return path


def _built_version(path: Path) -> int:
    return int(json.loads((path / TINY_MARKER).read_text()).get("version", 1))


def is_tiny_model(path: str | Path) -> bool:
    """Whether `path` holds a model built by `build_tiny_model`."""
    return (Path(path).expanduser() / TINY_MARKER).is_file()


def _move_into_place(staging: Path, path: Path) -> None:
    """Replace `path` with `staging`. An existing tiny model is replaced; anything else there is refused."""
    if path.exists():
        if not is_tiny_model(path) and any(path.iterdir()):
            raise FileExistsError(f"{path} exists and is not a Letterpress tiny model; refusing to overwrite it")
        shutil.rmtree(path)
    os.replace(staging, path)


def _build_components(seed: int) -> dict:
    """Random-weight components in float32, from a forked RNG so the caller's random state is untouched."""
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Ideogram4PromptEnhancerHead,
        Ideogram4Transformer2DModel,
    )
    from transformers import Qwen3VLConfig, Qwen3VLModel

    text_config = {
        "hidden_size": _TEXT_HIDDEN,
        "num_hidden_layers": _TEXT_LAYERS,
        "intermediate_size": 64,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "vocab_size": _TOKENIZER_VOCAB,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 5000000.0,
            "mrope_section": [2, 3, 3],
            "mrope_interleaved": True,
        },
    }
    vision_config = {
        "depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": _TEXT_HIDDEN,
        "deepstack_visual_indexes": [0],
    }
    transformer_config = {
        "in_channels": _VAE_LATENT_CHANNELS * 4,
        "num_layers": 2,
        "attention_head_dim": 32,
        "num_attention_heads": 2,
        "intermediate_size": 128,
        "adaln_dim": 32,
        "llm_features_dim": 13 * _TEXT_HIDDEN,
        "mrope_section": (6, 5, 5),  # sums to head_dim / 2
    }
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = Qwen3VLModel(Qwen3VLConfig(text_config=text_config, vision_config=vision_config))
        transformer = Ideogram4Transformer2DModel(**transformer_config)
        unconditional_transformer = Ideogram4Transformer2DModel(**transformer_config)
        vae = AutoencoderKLFlux2(
            block_out_channels=(32, 32, 32, 32),  # four levels: VAE scale factor 8, as in the real model
            layers_per_block=1,
            latent_channels=_VAE_LATENT_CHANNELS,
            norm_num_groups=8,
        )
        # magic prompt's LM head over the text encoder: random, so the tiny enhancer answers with text that is not a
        # caption (the invalid-output paths run for real; a valid caption needs a trained model)
        prompt_enhancer_head = Ideogram4PromptEnhancerHead(hidden_size=_TEXT_HIDDEN, vocab_size=_TOKENIZER_VOCAB)
    return {
        "prompt_enhancer_head": prompt_enhancer_head.float().eval(),
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "vae": vae.float().eval(),
        "text_encoder": text_encoder.float().eval(),
        "transformer": transformer.float().eval(),
        "unconditional_transformer": unconditional_transformer.float().eval(),
    }


def _build_tokenizer():
    """A Qwen-style byte-level BPE trained on a fixed corpus (deterministic), with the chat template attached."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=_TOKENIZER_VOCAB,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=1,
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS.split("\n"), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
