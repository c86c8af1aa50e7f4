"""What the bench modules share: the model under test and how its work is counted.

- `build_random_real`: the real Ideogram 4 architecture with random weights (real speed and memory, no checkpoint);
- `DEFAULT_PROMPT` and `make_spec`: the prompt and the `GenerationSpec` every timed call is made of;
- `step_flops`: matmul FLOPs of one denoising step, for the TFLOP/s columns;
- `uncompile`: drop the compiled wrappers `prepare_compiled` installed, to change weights or kernels underneath.

Used by `worker.bench.paths` (the side-by-side bench), `worker.bench.profile` (where a step's time goes) and
`worker.bench.e2e` (the worker process of the end-to-end run); it imports none of them.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from common.devstack.tiny_model import _build_tokenizer
from common.presets import PRESETS
from worker.pipeline.fast_path import transformers
from worker.pipeline.loading import LoadedPipeline
from worker.pipeline.spec import GenerationSpec

# A structured caption, the input the model is trained on (DESIGN.md): a typical prompt length.
DEFAULT_PROMPT = (
    '{"high_level_description": "A product photo of a white ceramic coffee mug on a wood table, with the word '
    'Monday printed on it in bold serif letters", "compositional_deconstruction": {"background": "a warm wooden '
    'table top in soft studio light, a blurred cafe interior behind it", "elements": [{"type": "obj", "desc": '
    '"a white ceramic coffee mug, centered, slight shadow to the right"}, {"type": "text", "text": "Monday", '
    '"desc": "bold black serif lettering on the side of the mug"}, {"type": "obj", "desc": "a small plate with '
    'a croissant at the left edge"}]}}'
)


# The text model of Qwen3-VL-8B, Ideogram 4's text encoder (and, with a head, its prompt enhancer)
QWEN3_VL_8B_TEXT = {"hidden_size": 4096, "num_hidden_layers": 36, "intermediate_size": 12288,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128, "vocab_size": 151936,
                    "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0,
                                        "mrope_section": [24, 20, 20], "mrope_interleaved": True}}


def build_random_real(device: str):
    """The real Ideogram 4 architecture (DESIGN.md sizes) with random weights, built on `device` in bf16.

    Qwen3-VL-8B-sized text encoder (36 layers of width 4,096; the pipeline taps 13 of them: 53,248 features a
    token), two default-config `Ideogram4Transformer2DModel`s (34 layers, width 4,608, SwiGLU 12,288) and the
    default Flux2 VAE. The tokenizer is the tiny model's byte-level BPE (the real vocabulary size is kept in the
    embedding table); it changes how many tokens a prompt has, which the report states.
    """
    # Lazy: diffusers and transformers take seconds to import, and only this build needs them here.
    from diffusers import (
        AutoencoderKLFlux2,
        FlowMatchEulerDiscreteScheduler,
        Ideogram4Pipeline,
        Ideogram4Transformer2DModel,
    )
    from transformers import Qwen3VLConfig, Qwen3VLModel

    text_config = QWEN3_VL_8B_TEXT
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            text_encoder = Qwen3VLModel(Qwen3VLConfig(text_config=text_config,
                                                      vision_config={"out_hidden_size": 4096})).eval()
            transformer = Ideogram4Transformer2DModel().eval()
            unconditional = Ideogram4Transformer2DModel().eval()
            vae = AutoencoderKLFlux2().eval()
    finally:
        torch.set_default_dtype(previous)
    pipe = Ideogram4Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae.to(torch.bfloat16),
                             text_encoder=text_encoder, tokenizer=_build_tokenizer(), transformer=transformer,
                             unconditional_transformer=unconditional)
    pipe.set_progress_bar_config(disable=True)
    return LoadedPipeline(pipe=pipe, device=device, dtype=torch.bfloat16, variant="bf16",
                          model_id="random-real-size", revision=None)


def make_spec(prompt: str, size: int, steps: int, seeds: Sequence[int], preset: str = "V4_QUALITY_48"):
    p = PRESETS[preset]
    return GenerationSpec(prompt_text=prompt, width=size, height=size, steps=steps, mu=p.mu, std=p.std,
                          guidance_schedule=p.guidance_schedule(steps), seeds=tuple(seeds))


def step_flops(pipe, *, text_tokens: int, image_tokens: int, batch: int, stock: bool, passes: int = 2) -> float:
    """Matmul FLOPs of one denoising step (conditional + unconditional pass; `passes=1`: the conditional pass only,
    a CFG-free step), from the transformer's config.

    Per layer and token: QKV + output projections (4 h^2) and the SwiGLU (3 h i), 2 FLOPs a multiply-add; per
    layer attention scores and values 4 L^2 h. The stock call also projects the 53,248 text features of every
    position at every step (padding and image rows of the conditional pass, all rows of the unconditional one);
    the fast path projects once a job, so that term is not counted for it.
    """
    cfg = pipe.transformer.config
    hidden = cfg.num_attention_heads * cfg.attention_head_dim
    layers, inter, features = cfg.num_layers, cfg.intermediate_size, cfg.llm_features_dim
    per_token = layers * 2 * (4 * hidden * hidden + 3 * hidden * inter)

    def one_pass(length: int, projected_rows: int) -> float:
        return length * per_token + layers * 4 * length * length * hidden + 2 * projected_rows * features * hidden

    cond_len = text_tokens + image_tokens
    if stock:
        total = one_pass(cond_len, cond_len) + (passes - 1) * one_pass(image_tokens, image_tokens)
    else:
        total = one_pass(cond_len, 0) + (passes - 1) * one_pass(image_tokens, 0)
    return float(batch * total)


def uncompile(pipe) -> None:
    """Drop the compiled wrappers `compile_repeated_blocks` installed (compiled graphs stay cached)."""
    for transformer in transformers(pipe):
        for module in transformer.modules():
            if getattr(module, "_compiled_call_impl", None) is not None:
                module._compiled_call_impl = None
    pipe._letterpress_compiled = False
