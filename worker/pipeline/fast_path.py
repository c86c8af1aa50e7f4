"""The worker's fast Ideogram 4 path: the stock pipeline's images, with the stock call's waste taken out.

Our own denoising loop over the pipeline's own components and helpers (`_logit_normal_sigmas`,
`_resolution_aware_mu`, `_prepare_ids`, `_get_text_encoder_hidden_states`, `prepare_latents`, the scheduler's
`step`); nothing in diffusers is patched. What it does differently from `Ideogram4Pipeline.__call__`, and why each
change keeps the result (see `Ideogram4Transformer2DModel.forward`):

1. **Text padded to the batch's longest prompt, not to 2,048 tokens.** The stock call left-pads every prompt to
   `max_sequence_length=2048`; the padding tokens sit in their own attention segment (the segment mask keeps real
   tokens from seeing them) and their outputs are thrown away, so they only cost time: a 300-token prompt at 1024²
   makes a 6,144-token sequence of which 1,748 tokens are padding. Here the text region is exactly as long as the
   prompt. Prompts of different lengths in one batch are left-padded (as the stock call does) to the longest,
   rounded up to a multiple of 64 to bound the shapes a compiled graph sees.
2. **No attention mask when nothing is padded.** With no padding the stock segment mask is all-true; passing
   `None` instead lets SDPA pick a flash or cuDNN kernel (any mask forces the slower memory-efficient kernel).
   A padded batch masks the padding keys, found from the stock `segment_ids` of the stock left-padded layout
   (`_prepare_ids`), so real tokens never see padding, exactly as under the stock mask (`_key_padding_mask`).
3. **The text projection once a job, only for text rows.** The transformer forward computes
   `llm_cond_proj(llm_cond_norm(features * text_mask)) * text_mask` (53,248 -> 4,608 per token) at every step
   and for every position. For image and padding rows the result is multiplied by zero; for text rows it depends
   only on the prompt and the weights. So it is computed once per prompt, for its text rows only, and the
   unconditional branch, whose text features are all zeros (every row masked), skips it entirely: adding an
   exact zero changes nothing.
4. **Text encoder run once per prompt, unpadded, and cached** (`TextConditionCache`): N seeds of one prompt, or
   the same prompt in the next job, reuse the projected text rows. The encoder is causal and its padding is
   masked, so a prompt's features do not depend on how much padding surrounds it.
5. **Rotary embeddings and the mask built once a job**, not at every step; the final layer runs on image rows
   only (it is per-token).
6. **Optional regional `torch.compile`** of the repeated transformer blocks (`prepare_compiled`), warmed up
   before the worker takes jobs.
7. **No unconditional pass at guidance 1.0** (the CFG-free presets, common.presets): the stock blend
   `g * cond + (1 - g) * uncond` is then `1 * cond + 0 * uncond`, which is the conditional velocity bit for bit
   (adding 0 * a finite value is exact), so that pass is skipped and the step costs one transformer instead of
   two. A checkpoint without an `unconditional_transformer` (distilled) runs only such schedules.

Beyond the stock call: **remix** (`GenerationSpec.init_image`, worker.pipeline.remix) starts from an encoded input
image noised to the sigma where its last `remix_steps` steps begin, and runs only those; the stock call has no
image-to-image mode, so a remix runs here only.

Equivalence (tested in `tests/worker/pipeline/test_fast_path.py`; float32, CPU, tiny model):

- **Bit-identical at equal text length.** Against the stock call run with `max_sequence_length` equal to the
  prompt's token count, the images are byte-for-byte the same (one prompt, several seeds), and the conditional
  pass over a left-padded mixed-length batch equals the stock transformer forward over the same layout bit for
  bit. So nothing this module changes (hoisted projection, no mask, key-padding mask, image-row final layer,
  cached and unpadded text encoding) moves a single bit by itself.
- **Within 1/255 of the stock default call, not bit-identical, and it cannot be.** The stock call pads to 2,048
  tokens. Padding is masked out, so it changes nothing in exact arithmetic, but SDPA (in the Qwen3-VL encoder and
  in the transformer) then reduces over 2,048 + image keys in a different blocking than over prompt + image keys,
  and float32 sums in a different order round differently (about 1e-7 relative). The stock call itself changes
  its pixels the same way when only its `max_sequence_length` changes (2,048 vs the prompt length). Measured over
  18 images (3 prompts incl. a JSON caption, 2 seeds, 12 to 48 steps, 64² to 256x128): 46 of 958,464 channel
  values (4.8e-5) differ, each by exactly 1 level of 255. A mixed-length batch differs from the stock batch
  (padded to 2,048) and from running its specs one at a time the same way, for the same reason.

On a GPU in bf16 the same reordering happens at bf16 precision; that tolerance is measured by the benchmark, not
here.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from diffusers import FlowMatchEulerDiscreteScheduler, Ideogram4Pipeline
from diffusers.models.transformers.transformer_ideogram4 import (
    SEQUENCE_PADDING_INDICATOR,
)
from diffusers.pipelines.ideogram4.pipeline_ideogram4 import (
    _logit_normal_sigmas,
    _resolution_aware_mu,
)

from common.presets import UNGUIDED, needs_unconditional
from common.prompt_tokens import chat_messages
from worker.pipeline import remix
from worker.pipeline.adapters import adapters_of
from worker.pipeline.previews import PreviewRequest, StepPreviews
from worker.pipeline.spec import (
    MAX_SEQUENCE_LENGTH,
    GenerationSpec,
    StepCallback,
    StepControl,
    StopCheck,
    UnsupportedRequest,
    co_batch_key,
    seed_generators,
)

if TYPE_CHECKING:
    from PIL import Image

    from worker.pipeline.loading import LoadedPipeline

# Left-padding of mixed-length batches is rounded up to this many tokens (bounds the shapes compile sees).
PAD_MULTIPLE = 64
# SDPA kernels the denoising loop prefers on CUDA, first that accepts the call wins (names of
# `torch.nn.attention.SDPBackend`); None keeps PyTorch's own order. Read when a compiled graph is traced, so set
# it before `prepare_compiled`. `letterpress bench` measures the choice (docs/PERFORMANCE.md).
SDPA_PRIORITY: tuple[str, ...] | None = None
# Rows of `embed_image_indicator`: 0 for text and padding positions, 1 for image positions.
_TEXT_ROW, _IMAGE_ROW = 0, 1


# --------------------------------------------------------------------------------------------------------------
# Text conditioning and its cache


@dataclass(frozen=True)
class TextCondition:
    """One prompt's text rows as the conditional transformer's first block receives them.

    `rows` is `llm_cond_proj(llm_cond_norm(features)) + embed_image_indicator[0]`, shape (1, tokens, hidden), in
    the transformer's dtype on its device: 11.6x smaller than the 53,248-wide encoder output it replaces.
    """

    tokens: int
    rows: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.rows.numel() * self.rows.element_size()


class TextConditionCache:
    """LRU of `TextCondition`s keyed by (prompt_text, model id, revision, variant); thread-safe.

    Bounded by entries and bytes (a 2,048-token prompt is about 19 MB in bf16 at the real model's width).
    `encodes` counts real text-encoder runs, `hits` the runs saved.
    """

    def __init__(self, max_entries: int = 128, max_bytes: int = 512 * 2**20):
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.hits = 0
        self.encodes = 0
        self._entries: OrderedDict[Hashable, TextCondition] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get_or_encode(self, key: Hashable, encode: Callable[[], TextCondition]) -> TextCondition:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                self.hits += 1
                return found
        value = encode()  # outside the lock: a prefetching thread must not block the generation loop
        with self._lock:
            self.encodes += 1
            if key not in self._entries:
                self._entries[key] = value
                self._bytes += value.nbytes
            self._evict()
        return value

    def discard(self, key: Hashable) -> None:
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes

    def discard_where(self, matches: Callable[[Hashable], bool]) -> None:
        for key in [k for k in list(self._entries) if matches(k)]:
            self.discard(key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0
            self.hits = self.encodes = 0

    def _evict(self) -> None:
        while len(self._entries) > 1 and (len(self._entries) > self.max_entries or self._bytes > self.max_bytes):
            _, old = self._entries.popitem(last=False)
            self._bytes -= old.nbytes


_caches: weakref.WeakKeyDictionary[Ideogram4Pipeline, TextConditionCache] = weakref.WeakKeyDictionary()
_caches_lock = threading.Lock()


def text_cache(loaded: LoadedPipeline) -> TextConditionCache:
    """The text cache of a loaded pipeline (one per pipeline object, gone with it)."""
    with _caches_lock:
        cache = _caches.get(loaded.pipe)
        if cache is None:
            cache = _caches[loaded.pipe] = TextConditionCache()
        return cache


def encode_text(loaded: LoadedPipeline, prompt_text: str) -> TextCondition:
    """The prompt's projected text rows, from the cache or by running the text encoder once.

    Public so a worker can encode the next job's prompt while the current one denoises.
    """
    return text_cache(loaded).get_or_encode(_cache_key(loaded, prompt_text),
                                            lambda: _encode_uncached(loaded.pipe, prompt_text,
                                                                     loaded.max_sequence_length))


def _cache_key(loaded: LoadedPipeline, prompt_text: str) -> tuple:
    return (prompt_text, loaded.model_id, loaded.revision, loaded.variant, adapters_of(loaded).active)


@torch.no_grad()
def _encode_uncached(pipe: Ideogram4Pipeline, prompt_text: str, limit: int) -> TextCondition:
    token_ids = _tokenize(pipe, prompt_text, limit)
    features = _text_features(pipe, token_ids)
    transformer = pipe.transformer
    projected = transformer.llm_cond_proj(transformer.llm_cond_norm(features.to(transformer.dtype)))
    rows = projected + transformer.embed_image_indicator.weight[_TEXT_ROW]
    return TextCondition(tokens=int(token_ids.shape[0]), rows=rows)


def _tokenize(pipe: Ideogram4Pipeline, prompt_text: str, limit: int = MAX_SEQUENCE_LENGTH) -> torch.Tensor:
    """Token ids of the chat-formatted prompt, exactly as `Ideogram4Pipeline.encode_prompt` makes them (the API
    counts them the same way, common.prompt_tokens, and refuses longer prompts before they get here)."""
    text = pipe.tokenizer.apply_chat_template(chat_messages(prompt_text), add_generation_prompt=True, tokenize=False)
    token_ids = pipe.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    if token_ids.shape[0] > limit:
        raise ValueError(f"prompt has {token_ids.shape[0]} tokens, exceeds max_sequence_length={limit}")
    return token_ids


def _text_features(pipe: Ideogram4Pipeline, token_ids: torch.Tensor) -> torch.Tensor:
    """The 13 tapped hidden states, concatenated per token like `encode_prompt` does: (1, tokens, 13 x width).

    One prompt, unpadded: the attention mask is all ones and positions run 0..n-1, as for the stock call's real
    tokens. Returned as float32 on the pipeline device, like the stock call's features.
    """
    te_device = pipe.text_encoder.device
    ids = token_ids[None].to(te_device)
    attention_mask = torch.ones_like(ids)
    positions = torch.arange(ids.shape[1], device=te_device)[None]
    selected = Ideogram4Pipeline._get_text_encoder_hidden_states(pipe.text_encoder, ids, attention_mask, positions)
    features = torch.stack(selected, dim=0).permute(1, 2, 3, 0).reshape(1, ids.shape[1], -1)
    return features.to(torch.float32).to(pipe._execution_device)


# --------------------------------------------------------------------------------------------------------------
# Batches


@dataclass
class _Conditioning:
    """Everything about a batch's packed sequences that stays fixed across steps."""

    text_block: torch.Tensor  # (B, L, hidden): text rows left-padded with the padding rows
    cond_rotary: tuple[torch.Tensor, torch.Tensor]  # over [text | image] positions
    uncond_rotary: tuple[torch.Tensor, torch.Tensor] | None  # over image positions; None: no unconditional pass
    attention_mask: torch.Tensor | None  # None when nothing is padded

    @property
    def text_len(self) -> int:
        return self.text_block.shape[1]


SKIP_UNGUIDED_PASS = True  # tests turn it off to compare against the two-pass blend


def transformers(pipe: Ideogram4Pipeline) -> list[torch.nn.Module]:
    """The pipeline's transformers: the unconditional one only if the checkpoint has it."""
    return [t for t in (pipe.transformer, pipe.unconditional_transformer) if t is not None]


def check_guidance_supported(pipe: Ideogram4Pipeline, spec: GenerationSpec) -> None:
    """A guided schedule needs the unconditional transformer, which a distilled checkpoint may not have."""
    if pipe.unconditional_transformer is None and needs_unconditional(spec.guidance_schedule):
        raise UnsupportedRequest(
            "this model is distilled (it has no unconditional_transformer) and cannot apply guidance: use a "
            "CFG-free preset (V4_FAST_20, V4_INSTANT_8) or guidance_scale 1.0")


def padded_text_length(token_counts: Sequence[int], multiple: int = PAD_MULTIPLE,
                       limit: int = MAX_SEQUENCE_LENGTH) -> int:
    """Text region length for a batch: the prompt length itself when all are equal (no padding, no mask),
    else the longest rounded up to `multiple` (padding is needed anyway, so bound the shapes)."""
    longest = max(token_counts)
    if min(token_counts) == longest:
        return longest
    return min(-(-longest // multiple) * multiple, limit)


def _prepare_conditioning(pipe: Ideogram4Pipeline, texts: list[TextCondition], grid_h: int, grid_w: int,
                          device: torch.device, limit: int = MAX_SEQUENCE_LENGTH) -> _Conditioning:
    """Lay out B images' text rows, positions and (if padded) the padding mask, as the stock call would for the
    same prompts but with `padded_text_length` instead of 2,048 text slots."""
    transformer, uncond = pipe.transformer, pipe.unconditional_transformer
    lengths = [t.tokens for t in texts]
    text_len = padded_text_length(lengths, limit=limit)
    position_ids, segment_ids, _ = Ideogram4Pipeline._prepare_ids(lengths, grid_h, grid_w, text_len, device)

    # Padding rows carry what the stock forward gives them: zero features and projection, plus the text-side
    # indicator embedding. The key-padding mask keeps them out of every real token's attention.
    pad_row = transformer.embed_image_indicator.weight[_TEXT_ROW]
    text_block = pad_row.expand(len(texts), text_len, -1).clone()
    for b, text in enumerate(texts):
        text_block[b, text_len - text.tokens:] = text.rows[0]

    return _Conditioning(
        text_block=text_block,
        cond_rotary=_rotary(transformer, position_ids),
        uncond_rotary=_rotary(uncond, position_ids[:, text_len:]) if uncond is not None else None,
        attention_mask=_key_padding_mask(segment_ids) if min(lengths) < text_len else None,
    )


def _key_padding_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, 1, S) boolean mask: every query may attend to every real (text or image) key, none to padding.

    The stock block-diagonal mask, (B, 1, S, S), also lets padding queries attend to padding keys. That only
    changes the padding rows' own outputs, which no real token ever reads (their keys are masked) and which are
    discarded, so real rows come out the same; the broadcast mask needs S times less memory (1 GB less for a batch
    of 4 at 2048²). Every row has real keys (the image tokens), so no row is fully masked.
    """
    return (segment_ids != SEQUENCE_PADDING_INDICATOR)[:, None, None, :]


def _rotary(transformer, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    cos, sin = transformer.rotary_emb(position_ids)
    return cos.to(transformer.dtype), sin.to(transformer.dtype)


def _transformer_pass(transformer, latents: torch.Tensor, t_model: torch.Tensor,
                      rotary: tuple[torch.Tensor, torch.Tensor], text_block: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """`Ideogram4Transformer2DModel.forward` for the packed [text | image] layout with the text rows precomputed.

    Returns the velocity for the image rows only, in float32. Image rows get `input_proj(latents)` plus the image
    indicator embedding (the forward's text term is an exact zero there); the blocks are the model's own.
    """
    hidden = transformer.input_proj(latents.to(transformer.dtype))
    hidden = hidden + transformer.embed_image_indicator.weight[_IMAGE_ROW]
    text_len = 0
    if text_block is not None:
        text_len = text_block.shape[1]
        hidden = torch.cat([text_block, hidden], dim=1)
    adaln_input = F.silu(transformer.adaln_proj(transformer.t_embedding(t_model).unsqueeze(1)))
    for block in transformer.layers:
        hidden = block(hidden, attention_mask, rotary, adaln_input)
    return transformer.final_layer(hidden[:, text_len:], conditioning=adaln_input).to(torch.float32)


def generate_batch(
    loaded: LoadedPipeline,
    specs: Sequence[GenerationSpec],
    *,
    on_step: StepCallback | None = None,
    should_stop: StopCheck | None = None,
    previews: PreviewRequest | None = None,
) -> list[list[Image.Image]]:
    """Generate every spec's images as one batch; returns one list of images per spec, in seed order.

    All specs must share `batch_key` (size, steps, schedule, guidance); prompts and seeds may differ. Each image's
    noise comes from its own seed, so an image does not depend on which batch it ran in (up to float rounding).
    """
    if not specs:
        return []
    keys = {co_batch_key(spec) for spec in specs}
    if len(keys) > 1:
        raise ValueError("specs in one batch must share size, steps, mu, std, guidance schedule and adapters")
    first = specs[0]
    preview = StepPreviews(loaded.pipe, previews, width=first.width, height=first.height) if previews else None
    control = StepControl(first.steps_run, on_step, should_stop, preview)
    control.check(0)
    adapters_of(loaded).activate(first.loras)  # before the text: a LoRA may wrap the text projection too
    texts = [text for spec in specs for text in [encode_text(loaded, spec.prompt_text)] * len(spec.seeds)]
    seeds = tuple(seed for spec in specs for seed in spec.seeds)
    with _attention_kernels(torch.device(loaded.device)):
        images = _denoise_and_decode(loaded, first, texts, seeds, control)
    return _split(images, [len(spec.seeds) for spec in specs])


@torch.no_grad()
def _denoise_and_decode(loaded: LoadedPipeline, spec: GenerationSpec, texts: list[TextCondition],
                        seeds: tuple[int, ...], control: StepControl) -> list[Image.Image]:
    """The stock denoising loop (same schedule, noise, guidance blend and scheduler step) over our passes."""
    pipe = loaded.pipe
    device = pipe._execution_device
    scale = pipe.vae_scale_factor * pipe.patch_size
    grid_h, grid_w = spec.height // scale, spec.width // scale
    batch = len(seeds)
    cond = _prepare_conditioning(pipe, texts, grid_h, grid_w, device, loaded.max_sequence_length)

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)  # our own state, thread-safe
    schedule_mu = _resolution_aware_mu(height=spec.height, width=spec.width, base_mu=spec.mu)
    sigmas = _logit_normal_sigmas(spec.steps, schedule_mu, std=spec.std, device=device)
    scheduler.set_timesteps(sigmas=sigmas.tolist(), device=device)
    guidance = torch.as_tensor(spec.guidance_schedule, dtype=torch.float32, device=device)
    check_guidance_supported(pipe, spec)
    num_train_timesteps = scheduler.config.num_train_timesteps

    latents = pipe.prepare_latents(
        batch_size=batch, num_image_tokens=grid_h * grid_w, latent_dim=pipe.transformer.config.in_channels,
        dtype=torch.float32, device=device, generator=seed_generators(loaded.device, seeds),
    )
    start = spec.steps - spec.steps_run  # a remix runs the schedule's last steps only (worker.pipeline.remix)
    if spec.init_image is not None:
        image = remix.encode_image(pipe, remix.input_pixels(spec.init_image.data), spec.width, spec.height)
        latents = remix.noised(image, latents, scheduler.sigmas[start].to(device))
        scheduler.set_begin_index(start)
    for i, t in enumerate(scheduler.timesteps[start:], start=start):
        t_model = (1.0 - (t.float() / num_train_timesteps)).expand(batch).to(pipe.transformer.dtype)
        pos_v = _transformer_pass(pipe.transformer, latents, t_model, cond.cond_rotary, cond.text_block,
                                  cond.attention_mask)
        weight = guidance[i]
        if spec.guidance_schedule[i] == UNGUIDED and SKIP_UNGUIDED_PASS:  # a Python float: no device sync
            velocity = weight * pos_v  # = weight * pos_v + 0 * neg_v, bit for bit (point 7 above)
        else:
            neg_v = _transformer_pass(pipe.unconditional_transformer, latents, t_model, cond.uncond_rotary)
            velocity = weight * pos_v + (1.0 - weight) * neg_v
        latents = scheduler.step(-velocity, t, latents, return_dict=False)[0]
        control.step_done(i + 1 - start, latents)
    return decode_latents(pipe, latents, grid_h, grid_w)


def _attention_kernels(device: torch.device):
    """`SDPA_PRIORITY` as a context (with fallback to the rest, so a kernel that refuses a mask costs nothing)."""
    if not SDPA_PRIORITY or device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = [getattr(SDPBackend, name) for name in SDPA_PRIORITY]
    order += [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH)
              if b not in order]
    return sdpa_kernel(order, set_priority=True)


def decode_latents(pipe: Ideogram4Pipeline, latents: torch.Tensor, grid_h: int, grid_w: int) -> list[Image.Image]:
    """Packed latents to PIL images (the stock call's step 9)."""
    z = remix.unpacked_latents(pipe, latents, grid_h, grid_w)
    decoded = pipe.vae.decode(z.to(pipe.vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(decoded.float(), output_type="pil")


def _split(images: list, counts: list[int]) -> list[list]:
    out, start = [], 0
    for count in counts:
        out.append(images[start:start + count])
        start += count
    return out


# --------------------------------------------------------------------------------------------------------------
# Regional compile


_WARMUP_PROMPTS = ("warm-up", "a longer warm-up prompt, so the compiled blocks see a second text length")


def prepare_compiled(loaded: LoadedPipeline, *, warmup_sizes: Sequence[tuple[int, int]] = ((1024, 1024),),
                     warmup_steps: int = 2, **compile_kwargs) -> None:
    """Compile the repeated transformer blocks of both transformers and warm them up; call at worker start.

    Regional compile (`compile_repeated_blocks`) compiles one block graph reused by all 34 layers: seconds, not
    minutes. The warm-up runs each size with two prompt lengths and once as a mixed batch, so the unpadded graph,
    its dynamic-length recompile and the masked graph all exist before the first job. `compile_kwargs` go to
    `torch.compile` (default `fullgraph=True`). Idempotent. The warm-up prompts stay out of the text cache.
    """
    pipe = loaded.pipe
    if not getattr(pipe, "_letterpress_compiled", False):
        compile_kwargs.setdefault("fullgraph", True)
        for transformer in transformers(pipe):
            transformer.compile_repeated_blocks(**compile_kwargs)
        pipe._letterpress_compiled = True
    adapters = adapters_of(loaded)
    for width, height in warmup_sizes:
        guidance = 5.0 if pipe.unconditional_transformer is not None else UNGUIDED  # both transformers, if any
        specs = [GenerationSpec(prompt_text=prompt, width=width, height=height, steps=warmup_steps, mu=0.0, std=1.5,
                                guidance_schedule=(guidance,) * warmup_steps, seeds=(0,)) for prompt in _WARMUP_PROMPTS]
        for spec in specs:
            generate_batch(loaded, [spec])
        generate_batch(loaded, specs)
        if adapters.uses_slots:  # the LoRA-on graph too (zero slots), so a job's first adapter compiles nothing
            with adapters.frozen():
                adapters.enable_slots_for_warmup()
                for spec in specs:
                    generate_batch(loaded, [spec])
                generate_batch(loaded, specs)
            adapters.activate(())
    _forget(loaded, _WARMUP_PROMPTS)


def _forget(loaded: LoadedPipeline, prompts: Sequence[str]) -> None:
    """Drop the prompts' entries, under whichever adapters they were encoded (keys start with the prompt)."""
    text_cache(loaded).discard_where(lambda key: key[0] in prompts)
