"""The fast path against the stock `Ideogram4Pipeline` call, float32 on CPU, tiny model.

What equivalence means here (measured, see worker/pipeline/fast_path.py):

- At equal text length the fast path is bit-identical to the stock call: hoisting the text projection, dropping
  the all-true mask, slicing the final layer, the key-padding mask and the text cache change no bit.
- Against the stock call's default padding to 2,048 tokens it cannot be: SDPA (text encoder and transformer) sums
  the same terms in a different grouping when the number of masked keys changes, so float32 results move by about
  1e-7 and a few uint8 values land one level away. The stock call itself moves the same way when only its
  `max_sequence_length` changes. The bound is therefore max 1/255 on a small fraction of values.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.worker.pipeline.tiny_pipeline import (
    LONG_CAPTION,
    SHORT_PROMPT,
    image_bytes,
    load_tiny,
    make_spec,
    pixel_diff,
)
from worker.pipeline import fast_path
from worker.pipeline.fast_path import (
    PAD_MULTIPLE,
    TextCondition,
    TextConditionCache,
    generate_batch,
    padded_text_length,
    prepare_compiled,
    text_cache,
)
from worker.pipeline.generation import generate
from worker.pipeline.spec import MAX_SEQUENCE_LENGTH
from worker.pipeline.stock import stock_call_kwargs

# Largest honest pixel tolerance against the stock call at its default 2,048-token padding (see module docstring).
MAX_LEVELS = 1
MAX_DIFFERING_FRACTION = 0.005


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_tiny(tmp_path_factory.mktemp("fast-path-model"))


@pytest.fixture(autouse=True)
def fresh_cache(loaded):
    text_cache(loaded).clear()


def token_count(loaded, prompt: str) -> int:
    return int(fast_path._tokenize(loaded.pipe, prompt).shape[0])


def stock_images(loaded, spec, *, max_sequence_length: int = MAX_SEQUENCE_LENGTH) -> list:
    kwargs = stock_call_kwargs(loaded, spec)
    kwargs["max_sequence_length"] = max_sequence_length
    return list(loaded.pipe(**kwargs).images)


def test_one_prompt_several_seeds_bit_identical_to_stock_at_equal_text_length(loaded):
    spec = make_spec(SHORT_PROMPT, seeds=(1, 2, 3))
    stock = stock_images(loaded, spec, max_sequence_length=token_count(loaded, spec.prompt_text))
    assert image_bytes(generate(loaded, spec, fast=True)) == image_bytes(stock)


def test_one_prompt_several_seeds_within_one_level_of_the_stock_default_call(loaded):
    spec = make_spec(LONG_CAPTION, seeds=(4, 5))
    largest, fraction = pixel_diff(generate(loaded, spec, fast=True), generate(loaded, spec, fast=False))
    assert largest <= MAX_LEVELS
    assert fraction <= MAX_DIFFERING_FRACTION


def test_prompts_of_different_lengths_in_one_batch_match_the_stock_batch(loaded):
    short, long = make_spec(SHORT_PROMPT, seeds=(7,)), make_spec(LONG_CAPTION, seeds=(9,))
    lengths = [token_count(loaded, short.prompt_text), token_count(loaded, long.prompt_text)]
    assert lengths[0] != lengths[1] and padded_text_length(lengths) % PAD_MULTIPLE == 0  # the masked path
    stock_kwargs = stock_call_kwargs(loaded, short)
    stock_kwargs.update(prompt=[short.prompt_text, long.prompt_text], num_images_per_prompt=1,
                        generator=[torch.Generator("cpu").manual_seed(s) for s in (7, 9)])
    stock = list(loaded.pipe(**stock_kwargs).images)

    fast = generate_batch(loaded, [short, long])

    assert [len(images) for images in fast] == [1, 1]
    largest, fraction = pixel_diff(fast[0] + fast[1], stock)
    assert largest <= MAX_LEVELS
    assert fraction <= MAX_DIFFERING_FRACTION


def _stock_forward_inputs(loaded, prompts, grid_h, grid_w, text_len, latents):
    """The stock transformer's inputs for `prompts` left-padded to `text_len` (as `__call__` builds them)."""
    pipe = loaded.pipe
    features = [fast_path._text_features(pipe, fast_path._tokenize(pipe, p)) for p in prompts]
    lengths = [f.shape[1] for f in features]
    position_ids, segment_ids, indicator = pipe._prepare_ids(lengths, grid_h, grid_w, text_len, torch.device("cpu"))
    batch, num_image = len(prompts), grid_h * grid_w
    encoder = torch.zeros(batch, text_len + num_image, features[0].shape[-1])
    for b, f in enumerate(features):
        encoder[b, text_len - f.shape[1]:text_len] = f[0]
    hidden = torch.cat([torch.zeros(batch, text_len, latents.shape[-1]), latents], dim=1)
    return {"hidden_states": hidden, "encoder_hidden_states": encoder, "position_ids": position_ids,
                "segment_ids": segment_ids, "indicator": indicator}


@torch.no_grad()
def test_conditional_pass_with_left_padding_is_bit_identical_to_the_stock_forward(loaded):
    pipe, grid_h, grid_w = loaded.pipe, 3, 2
    prompts = [SHORT_PROMPT, LONG_CAPTION]
    texts = [fast_path.encode_text(loaded, p) for p in prompts]
    cond = fast_path._prepare_conditioning(pipe, texts, grid_h, grid_w, torch.device("cpu"))
    assert cond.attention_mask is not None  # padded: the short prompt is left-padded
    latents = torch.randn(2, grid_h * grid_w, 16, generator=torch.Generator().manual_seed(0))
    timestep = torch.tensor([0.3, 0.3])
    inputs = _stock_forward_inputs(loaded, prompts, grid_h, grid_w, cond.text_len, latents)

    stock = pipe.transformer(timestep=timestep, return_dict=False, **inputs)[0][:, cond.text_len:]
    fast = fast_path._transformer_pass(pipe.transformer, latents, timestep, cond.cond_rotary, cond.text_block,
                                       cond.attention_mask)
    assert torch.equal(fast, stock)


@torch.no_grad()
def test_unconditional_pass_skips_projection_and_mask_exactly(loaded):
    pipe, grid_h, grid_w = loaded.pipe, 3, 2
    cond = fast_path._prepare_conditioning(pipe, [fast_path.encode_text(loaded, SHORT_PROMPT)], grid_h, grid_w,
                                           torch.device("cpu"))
    assert cond.attention_mask is None  # one prompt: nothing padded
    latents = torch.randn(1, grid_h * grid_w, 16, generator=torch.Generator().manual_seed(1))
    timestep = torch.tensor([0.7])
    inputs = _stock_forward_inputs(loaded, [SHORT_PROMPT], grid_h, grid_w, cond.text_len, latents)
    text_len = cond.text_len

    stock = pipe.unconditional_transformer(
        hidden_states=latents, timestep=timestep,
        encoder_hidden_states=torch.zeros(1, grid_h * grid_w, inputs["encoder_hidden_states"].shape[-1]),
        position_ids=inputs["position_ids"][:, text_len:], segment_ids=inputs["segment_ids"][:, text_len:],
        indicator=inputs["indicator"][:, text_len:], return_dict=False,
    )[0]
    fast = fast_path._transformer_pass(pipe.unconditional_transformer, latents, timestep, cond.uncond_rotary)
    assert torch.equal(fast, stock)


def test_padded_text_length():
    assert padded_text_length([37]) == 37  # one prompt: no padding at all, hence no mask
    assert padded_text_length([37, 37, 37]) == 37
    assert padded_text_length([21, 44]) == 64
    assert padded_text_length([21, 65]) == 128
    assert padded_text_length([10, 2040]) == MAX_SEQUENCE_LENGTH  # never beyond the stock limit


def test_batch_gives_each_spec_its_images(loaded):
    first, second = make_spec(SHORT_PROMPT, seeds=(1, 2)), make_spec(LONG_CAPTION, seeds=(3,))
    batched = generate_batch(loaded, [first, second])
    alone = [generate(loaded, first), generate(loaded, second)]
    assert [len(images) for images in batched] == [2, 1]
    # Same noise per seed; only the padding of the short prompt differs (one level at most, as above).
    largest, fraction = pixel_diff(batched[0] + batched[1], alone[0] + alone[1])
    assert largest <= MAX_LEVELS and fraction <= MAX_DIFFERING_FRACTION


def test_batch_refuses_specs_of_different_shapes(loaded):
    with pytest.raises(ValueError, match="share size"):
        generate_batch(loaded, [make_spec(width=32), make_spec(width=48)])


def test_several_seeds_encode_once(loaded):
    generate(loaded, make_spec(seeds=(1, 2, 3)))
    cache = text_cache(loaded)
    assert (cache.encodes, cache.hits) == (1, 0)


def test_repeated_prompt_hits_the_cache(loaded):
    spec = make_spec(seeds=(1,))
    first = generate(loaded, spec)
    second = generate(loaded, spec)
    cache = text_cache(loaded)
    assert (cache.encodes, cache.hits) == (1, 1)
    assert image_bytes(first) == image_bytes(second)


def test_batch_of_one_prompt_encodes_once(loaded):
    generate_batch(loaded, [make_spec(seeds=(1,)), make_spec(seeds=(2, 3)), make_spec(LONG_CAPTION, seeds=(4,))])
    cache = text_cache(loaded)
    assert (cache.encodes, cache.hits) == (2, 1)


def _condition(tokens: int) -> TextCondition:
    return TextCondition(tokens=tokens, rows=torch.zeros(1, tokens, 4))


def test_cache_is_lru_bounded_by_entries_and_bytes():
    cache = TextConditionCache(max_entries=2, max_bytes=10**9)
    for key in ("a", "b", "a", "c"):  # "a" used again, so "b" is the least recently used
        cache.get_or_encode(key, lambda: _condition(3))
    assert len(cache) == 2 and (cache.encodes, cache.hits) == (3, 1)
    cache.get_or_encode("b", lambda: _condition(3))
    assert cache.encodes == 4  # "b" had been evicted

    small = TextConditionCache(max_entries=100, max_bytes=2 * _condition(10).nbytes)
    for key in range(5):
        small.get_or_encode(key, lambda: _condition(10))
    assert len(small) == 2


def test_prompt_over_the_stock_limit_is_refused(loaded):
    too_long = " ".join(f"w{i}" for i in range(MAX_SEQUENCE_LENGTH))
    with pytest.raises(ValueError, match="max_sequence_length"):
        generate(loaded, make_spec(too_long, seeds=(1,)))


def test_the_limit_is_the_loaded_pipelines_setting(loaded):
    """`settings.model.max_sequence_length` (carried by the loaded pipeline) is what both paths enforce."""
    small = dataclasses.replace(loaded, max_sequence_length=token_count(loaded, SHORT_PROMPT) - 1)
    spec = make_spec(SHORT_PROMPT, seeds=(1,))
    with pytest.raises(ValueError, match=f"max_sequence_length={small.max_sequence_length}"):
        generate(small, spec)
    assert stock_call_kwargs(small, spec)["max_sequence_length"] == small.max_sequence_length
    assert padded_text_length([10, 100], limit=96) == 96


def test_prepare_compiled_warms_up_and_keeps_the_images(tmp_path_factory, loaded):
    compiled = load_tiny(tmp_path_factory.mktemp("compiled-model"))
    torch._dynamo.reset()  # other tests in this process compiled the same block code (inductor): no stale entries
    # The eager backend exercises the regional-compile wiring (dynamo, guards, recompiles) without a C++ toolchain.
    prepare_compiled(compiled, warmup_sizes=[(32, 32)], warmup_steps=1, backend="eager")
    prepare_compiled(compiled, warmup_sizes=[], backend="eager")  # idempotent
    assert len(text_cache(compiled)) == 0  # warm-up prompts do not occupy the cache
    spec = make_spec(LONG_CAPTION, seeds=(5,))
    assert image_bytes(generate(compiled, spec)) == image_bytes(generate(loaded, spec))
