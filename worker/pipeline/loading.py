"""The one loader for Ideogram 4: Hub ids and local directories, every weight variant, actionable errors.

`load_pipeline(settings.model)` is all a worker calls. It picks the weight variant from the device (an explicit
setting wins, impossible choices are refused before anything is downloaded), loads through the stock
`Ideogram4Pipeline.from_pretrained` with the token, cache and offline settings passed explicitly (the Hugging Face
libraries read their environment only at import time), and turns the libraries' exceptions into one
`ModelConfigError` whose message says what to do.

Variants (the memory figures are for the real model):

| variant       | weights in memory                                   | where                              |
|---------------|-----------------------------------------------------|------------------------------------|
| `fp32`        | float32                                             | CPU default (the tiny model)       |
| `bf16`        | bfloat16, about 50 GiB (36 with the encoder offloaded) | Ampere with 48 GB and more      |
| `nf4`         | bitsandbytes NF4 as shipped, about 16 GiB (12)      | 24-40 GB GPUs; CUDA only           |
| `nf4-dequant` | NF4 weights dequantized once to bf16 (transformers) | NF4's numbers at bf16 speed        |
| `fp8`         | torchao float8 rowwise in the transformer blocks    | sm_89+ from 40 GB, approximate     |
| `int8`        | torchao int8 dynamic per row in the transformer blocks | sm_80+ (for Ampere), approximate |

`auto` picks a memory plan (worker.pipeline.memory_plans): the fastest exact variant whose measured peak fits this
GPU at the largest image the API accepts (`api.max_width` x `api.max_height`), with the text encoder resident, or
offloaded to CPU memory between jobs (`TextEncoderOffload`) when only that fits. An explicit variant gets the
placement that fits it, and one that fits in no placement is refused at start, naming the plan that would.

fp8 and int8 are approximate (8-bit activations and weights) and only ever loaded by name. int8 is for GPUs without
fp8 (Ampere: A100, A10, RTX 30xx, whose int8 tensor cores run at twice their bf16 rate); it was measured on an H200
only, where it ran 1.06x bf16 (docs/PERFORMANCE.md, "The int8 variant on the H200"), and its memory plan is not
measured, so it loads with the text encoder resident, unchecked.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from common.errors import ModelError
from common.settings import ModelSettings, Settings, get_settings, hf_env, hub_cache_dir
from worker.pipeline import memory_plans
from worker.pipeline.memory_plans import MemoryPlan
from worker.pipeline.spec import MAX_SEQUENCE_LENGTH

if TYPE_CHECKING:
    from diffusers import Ideogram4Pipeline

log = logging.getLogger(__name__)

VARIANTS = ("fp32", "bf16", "nf4", "nf4-dequant", "fp8", "int8")
DEFAULT_HUB_MODEL = "ideogram-ai/ideogram-4-nf4"
FP8_MIN_CAPABILITY = memory_plans.FP8_MIN_CAPABILITY
INT8_MIN_CAPABILITY = memory_plans.INT8_MIN_CAPABILITY
_QUANTIZED_TRANSFORMERS = ("transformer", "unconditional_transformer")
_NF4_COMPONENTS = ("transformer", "unconditional_transformer", "text_encoder")


class ModelConfigError(ModelError):
    """The model cannot be loaded as configured; the message says what to do instead."""


@dataclass(frozen=True)
class DeviceInfo:
    """What variant selection needs to know about a device (a plain value, so selection is testable on CPU)."""

    kind: Literal["cpu", "cuda"]
    total_memory: int = 0  # bytes; 0 on CPU
    capability: tuple[int, int] | None = None  # CUDA compute capability, e.g. (9, 0) for H100
    name: str = "cpu"
    index: int | None = None  # CUDA device index when one was named ("cuda:1")

    @property
    def torch_device(self) -> str:
        if self.kind == "cpu":
            return "cpu"
        return "cuda" if self.index is None else f"cuda:{self.index}"


@dataclass
class LoadedPipeline:
    """A warm pipeline and how it was loaded (model id and revision end up in every PNG's recipe)."""

    pipe: Ideogram4Pipeline
    device: str
    dtype: torch.dtype
    variant: str
    model_id: str
    revision: str | None
    max_sequence_length: int = MAX_SEQUENCE_LENGTH  # longest prompt in tokens (settings.model)
    adapters: Any = None  # worker.pipeline.adapters.LoadedAdapters, made on first use (adapters_of)
    text_encoder: str = "resident"  # or "offload" (TextEncoderOffload): the memory plan's placement


def detect_device(device: str | None = None) -> DeviceInfo:
    """Describe `device` ("cpu", "cuda", "cuda:1"; None picks CUDA when available)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not device.startswith("cuda"):
        return DeviceInfo(kind="cpu")
    if not torch.cuda.is_available():
        raise ModelConfigError(f"device {device!r} requested but CUDA is not available to torch on this machine")
    index = torch.device(device).index
    props = torch.cuda.get_device_properties(torch.device(device))
    return DeviceInfo(kind="cuda", total_memory=props.total_memory, capability=(props.major, props.minor),
                      name=props.name, index=index)


def resolve_variant(requested: str, device_info: DeviceInfo, *,
                    max_pixels: int = memory_plans.MAX_MEASURED_PIXELS) -> str:
    """The weight variant to load (`resolve_plan`'s variant). Pure function of its arguments."""
    return resolve_plan(requested, device_info, max_pixels=max_pixels).variant


def resolve_plan(requested: str, device_info: DeviceInfo, *,
                 max_pixels: int = memory_plans.MAX_MEASURED_PIXELS) -> MemoryPlan:
    """The variant and text-encoder placement to load for images up to `max_pixels` pixels.

    "auto" takes the fastest measured plan that fits the GPU (worker.pipeline.memory_plans); an explicit variant
    gets the placement that fits it. Raises `ModelConfigError` for unknown names, impossible choices and plans
    that do not fit, before anything is downloaded. Pure function of its arguments.
    """
    variant = (requested or "auto").strip().lower()
    if variant != "auto" and variant not in VARIANTS:
        raise ModelConfigError(f"unknown model variant {requested!r}: choose one of auto, {', '.join(VARIANTS)}")
    if device_info.kind == "cpu":
        if variant in ("nf4", "nf4-dequant"):
            raise ModelConfigError(
                f"variant {variant} needs bitsandbytes and a CUDA GPU, and this worker has none: "
                "use fp32 (or bf16, slower) on CPU"
            )
        if variant in _GPU_NEEDS:
            check_gpu_capable(variant, device_info)
        return MemoryPlan(variant="fp32" if variant == "auto" else variant, text_encoder="resident")
    if variant in _GPU_NEEDS:
        check_gpu_capable(variant, device_info)
    if variant == "fp32":  # not in the table: float32 on a GPU is a debugging choice
        return MemoryPlan(variant="fp32", text_encoder="resident")
    if variant != "auto" and variant not in memory_plans.MEASURED_VARIANTS:
        log.warning("no memory plan is measured for variant %s: loading it with the text encoder resident, "
                    "unchecked", variant)
        return MemoryPlan(variant=variant, text_encoder="resident")
    if memory_plans.measured_side(max_pixels) is None:
        if variant == "auto":
            raise ModelConfigError(
                f"no memory plan is measured for images over {memory_plans.MAX_MEASURED_PIXELS:,} pixels (this "
                f"worker may be sent {max_pixels:,}): set LETTERPRESS_MODEL__VARIANT explicitly")
        log.warning("no memory plan is measured for images over %d pixels: loading %s unchecked",
                    memory_plans.MAX_MEASURED_PIXELS, variant)
        return MemoryPlan(variant=variant, text_encoder="resident")
    best = memory_plans.choose(device_info.total_memory, device_info.capability, max_pixels)
    if variant == "auto":
        if best is None:
            raise ModelConfigError(_no_plan_message(device_info, max_pixels))
        return best
    plan = memory_plans.placement_for(variant, device_info.total_memory, max_pixels)
    if plan is None:
        needed = memory_plans.plan_for(variant, "offload", max_pixels)
        instead = (f"{best.describe()} fits: set LETTERPRESS_MODEL__VARIANT={best.variant} (or auto), or lower "
                   "LETTERPRESS_API__MAX_WIDTH/MAX_HEIGHT" if best else _no_plan_message(device_info, max_pixels))
        raise ModelConfigError(
            f"variant {variant} does not fit {_gpu(device_info)} for images of up to {max_pixels:,} pixels: it "
            f"needs {needed.need_bytes / 1e9:.1f} GB even with the text encoder offloaded (measured, "
            f"docs/PERFORMANCE.md \"Memory plans per GPU class\"). {instead}")
    return plan


def _gpu(device_info: DeviceInfo) -> str:
    return f"{device_info.name} ({device_info.total_memory / 1e9:.1f} GB)"


def _no_plan_message(device_info: DeviceInfo, max_pixels: int) -> str:
    least = memory_plans.smallest(max_pixels)
    need = f"the smallest measured plan, {least.describe()}" if least else "every measured plan"
    return (f"no measured memory plan fits {_gpu(device_info)} for images of up to {max_pixels:,} pixels: {need}, "
            "does not fit; use a larger GPU or lower LETTERPRESS_API__MAX_WIDTH/MAX_HEIGHT")


# The variants that need a CUDA GPU of at least a compute capability: (capability, what it needs, what to use
# instead). int8's floor is bf16's: everything around its int8 matmuls computes in bf16.
_GPU_NEEDS = {
    "fp8": (FP8_MIN_CAPABILITY, "fp8 needs a GPU with fp8 tensor cores, compute capability 8.9 or newer: Ada (L4, "
            "L40S, RTX 4090), Hopper (H100, H200, the tested target) or Blackwell (B200)", "bf16 or nf4"),
    "int8": (INT8_MIN_CAPABILITY, "int8 needs a CUDA GPU of compute capability 8.0 or newer (int8 matmuls, bf16 "
             "around them): Ampere (A100, A10, RTX 30xx, the intended target), Ada, Hopper (H200, the tested one) "
             "or Blackwell", "nf4"),
}


def check_gpu_capable(variant: str, device_info: DeviceInfo) -> None:
    """Refuse fp8 or int8 on a device without the tensor cores it runs on (the bench skips such stages too)."""
    minimum, supported, instead = _GPU_NEEDS[variant]
    if device_info.kind != "cuda":
        raise ModelConfigError(f"{supported}; this worker has no CUDA GPU: use fp32 on CPU")
    cap = device_info.capability or (0, 0)
    if cap < minimum:
        raise ModelConfigError(
            f"{supported}; {device_info.name} is sm_{cap[0]}{cap[1]}: use {instead} on this GPU"
        )


def dtype_for(variant: str) -> torch.dtype:
    """The compute dtype of a variant (NF4, fp8 and int8 compute in bf16)."""
    return torch.float32 if variant == "fp32" else torch.bfloat16


def default_model_id(settings: Settings, device_info: DeviceInfo | None = None) -> str:
    """The model a worker loads when `settings.model.id` is empty.

    Without a GPU: the tiny random-weight model at `settings.tiny_model_dir` (`letterpress worker` and
    `letterpress up` build it there first, so a fresh CPU machine runs the whole platform with no download; the
    worker itself never builds models). With one: the published NF4 weights.
    """
    if settings.model.id:
        return settings.model.id
    device_info = device_info or detect_device()
    if device_info.kind == "cuda":
        return DEFAULT_HUB_MODEL
    path = settings.tiny_model_dir
    if not (path / "model_index.json").is_file():
        raise ModelConfigError(
            f"no model configured and no GPU, and no tiny model at {path}: set LETTERPRESS_MODEL__ID, or build it "
            f"with `letterpress model init-tiny {path}` (`letterpress worker` and `letterpress up` do that for you)")
    return str(path)


def load_pipeline(model: ModelSettings, device: str | None = None, *, settings: Settings | None = None
                  ) -> LoadedPipeline:
    """Load Ideogram 4 as `model` says, on `device` (default: CUDA when available), warm and ready.

    `settings` is consulted when `model.id` is empty (for the default model's home) and, on a GPU, for the largest
    image the API accepts (the memory plan's size); it defaults to the process settings.
    """
    device_info = detect_device(device)
    max_pixels = memory_plans.MAX_MEASURED_PIXELS
    if device_info.kind == "cuda":
        api = (settings or get_settings()).api  # the largest image this worker may be sent
        max_pixels = api.max_width * api.max_height
    plan = resolve_plan(model.variant, device_info, max_pixels=max_pixels)
    variant = plan.variant
    if device_info.kind == "cuda":
        log.info("memory plan for %s: %s", _gpu(device_info), plan.describe())
    model_id = model.id
    if not model_id:
        base = settings or get_settings()
        model_id = default_model_id(base.model_copy(update={"model": model}), device_info)
    source = _ModelSource.from_settings(model_id, model)
    if source.local_dir is None and source.looks_local:
        raise not_found_error(model_id, "no such directory")
    try:
        pipe, variant = _load(source, plan, device_info)
    except ModelConfigError:
        raise
    except Exception as exc:
        raise translate_load_error(exc, model_id=model_id, variant=variant, device_info=device_info,
                                   offline=source.offline) from exc
    pipe.set_progress_bar_config(disable=True)
    return LoadedPipeline(pipe=pipe, device=device_info.torch_device, dtype=dtype_for(variant), variant=variant,
                          model_id=model_id, revision=source.resolved_revision(),
                          max_sequence_length=model.max_sequence_length, text_encoder=plan.text_encoder)


@dataclass(frozen=True)
class _ModelSource:
    """Where weights come from and the Hub options to reach them."""

    model_id: str
    revision: str | None
    token: str | None
    cache_dir: str | None
    offline: bool

    @classmethod
    def from_settings(cls, model_id: str, model: ModelSettings) -> _ModelSource:
        env = hf_env(model)
        offline = env.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
        cache_dir = hub_cache_dir(model)
        return cls(model_id=model_id, revision=model.revision, token=env.get("HF_TOKEN") or None,
                   cache_dir=cache_dir, offline=offline)

    @property
    def local_dir(self) -> Path | None:
        path = Path(self.model_id).expanduser()
        return path if path.is_dir() else None

    @property
    def looks_local(self) -> bool:
        """A path rather than a Hub id (`org/name`): absolute, relative with ./ or ~, or more than one slash."""
        mid = self.model_id
        return mid.startswith(("/", ".", "~")) or mid.count("/") > 1 or (os.sep != "/" and os.sep in mid)

    def hub_kwargs(self) -> dict[str, Any]:
        if self.local_dir is not None:
            return {}
        return {"revision": self.revision, "token": self.token, "cache_dir": self.cache_dir,
                    "local_files_only": self.offline}

    def model_index(self) -> dict:
        """The checkpoint's model_index.json: which components it ships."""
        import json

        if self.local_dir is not None:
            return json.loads((self.local_dir / "model_index.json").read_text())
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(self.model_id, "model_index.json", **self.hub_kwargs())).read_text())

    def read_component_config(self, component: str) -> dict:
        """A component's config.json, from the local directory or the Hub (a small download, cached)."""
        import json

        if self.local_dir is not None:
            path = self.local_dir / component / "config.json"
            return json.loads(path.read_text()) if path.is_file() else {}
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(self.model_id, f"{component}/config.json", **self.hub_kwargs())
        return json.loads(Path(path).read_text())

    def resolved_revision(self) -> str | None:
        """The commit a Hub load used (read from the cache's snapshot path), else the requested revision."""
        if self.local_dir is not None:
            return self.revision
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(self.model_id, "model_index.json", cache_dir=self.cache_dir,
                                        revision=self.revision)
        match = re.search(r"snapshots[/\\]([0-9a-f]{40})[/\\]", cached) if isinstance(cached, str) else None
        return match.group(1) if match else self.revision


def _load(source: _ModelSource, plan: MemoryPlan, device_info: DeviceInfo) -> tuple[Ideogram4Pipeline, str]:
    """Load, place on the device as `plan` says and convert to its variant; returns the pipeline and the variant it
    really is."""
    from diffusers import Ideogram4Pipeline

    variant = plan.variant

    kwargs = dict(dtype=dtype_for(variant), **source.hub_kwargs())
    distilled = not _ships_unconditional(source)
    if distilled:  # a distilled checkpoint: CFG-free presets only (worker.pipeline.fast_path)
        kwargs["unconditional_transformer"] = None
    if variant in ("nf4", "nf4-dequant"):
        kwargs["quantization_config"] = _nf4_config(source, skip=("unconditional_transformer",) if distilled else ())
    pipe = Ideogram4Pipeline.from_pretrained(source.model_id, **kwargs)
    if plan.text_encoder == "offload" and pipe.text_encoder is not None and device_info.kind == "cuda":
        pipe._letterpress_text_offload = TextEncoderOffload(pipe.text_encoder, device_info.torch_device)
        if getattr(pipe, "prompt_enhancer_head", None) is not None:
            log.warning("the text encoder is offloaded: the worker's own magic prompt would copy it onto the GPU "
                        "for every token; point LETTERPRESS_MAGIC_PROMPT__ENDPOINT at a server instead")
    dequantized = place_components(pipe, variant, device_info.torch_device)
    if dequantized and variant == "bf16":
        # bf16 from a checkpoint that ships NF4 (the default Hub model) runs NF4's numbers densely.
        log.info("%s ships NF4 weights: dequantized them to bf16 (variant nf4-dequant)", source.model_id)
        variant = "nf4-dequant"
    return pipe, variant


def place_components(pipe: Ideogram4Pipeline, variant: str, device: str) -> int:
    """Move the pipeline's models to `device` one at a time, converting each transformer as it arrives.

    fp8 and int8 quantize each block linear as it arrives (torchao's `quantize_(..., device=)`), so a bf16
    transformer never sits whole on the GPU: loading a bf16 pipeline first would need the card the plan avoids. An
    offloaded text encoder stays where its `TextEncoderOffload` put it. Returns how many NF4 layers were
    dequantized.
    """
    dequantized = 0
    for name, module in pipe.components.items():
        if not isinstance(module, torch.nn.Module):
            continue
        if name == "text_encoder" and getattr(pipe, "_letterpress_text_offload", None) is not None:
            continue
        if name in _QUANTIZED_TRANSFORMERS and variant in _QUANTIZERS:
            dequantized += dequantize_linear4bit(module)  # an NF4 checkpoint (bitsandbytes loaded it on the GPU)
            _QUANTIZERS[variant](module, device=device)  # one block linear at a time onto the device
            continue
        module.to(device)
        if name in _QUANTIZED_TRANSFORMERS and variant != "nf4":
            dequantized += dequantize_linear4bit(module)
    return dequantized


class TextEncoderOffload:
    """The text encoder's repeated blocks live in (pinned) CPU memory; each is copied onto the GPU for its own
    forward only, then dropped.

    Why: the encoder runs once a job (not at all for a cached prompt), yet resident it holds its whole 15 GiB
    (bf16) through every denoising step and the VAE decode. Offloaded, the GPU holds one block (0.4 GB) while a
    prompt is encoded and none otherwise; each new prompt pays one host-to-device copy of the blocks (+0.25 s for a
    bf16 encoder on the H200; docs/PERFORMANCE.md, "Memory plans per GPU class"). Everything outside the blocks
    (embeddings, norms, rotary tables, the vision stem) stays on the GPU, so the module still reports the GPU as its
    device and its inputs need no moving. Blocks are the entries of the encoder's `nn.ModuleList`s (the decoder
    layers, the vision blocks and mergers). For bitsandbytes NF4 blocks only the packed weights move; their
    quantization state stays on the GPU. The features are the resident encoder's, bit for bit (measured, bf16 and
    NF4). One encode at a time: two threads encoding at once would drop each other's blocks.
    """

    def __init__(self, text_encoder: torch.nn.Module, device: str):
        self.device = torch.device(device)
        self.blocks = list(_repeated_blocks(text_encoder))
        in_blocks = {id(t) for block in self.blocks for t in (*block.parameters(), *block.buffers())}
        for module in text_encoder.modules():  # everything but the blocks' weights onto the device, for good
            for param in module.parameters(recurse=False):
                if id(param) not in in_blocks:
                    param.data = param.data.to(self.device)
            for name, buf in module.named_buffers(recurse=False):
                module._buffers[name] = buf.to(self.device)
        self.pinned = True
        self._masters: list[list[tuple[torch.nn.Parameter, torch.Tensor]]] = []
        self._hooks = []
        for block in self.blocks:
            pairs = [(p, self._master(p.data)) for p in block.parameters()]
            for p, master in pairs:
                p.data = master
            self._masters.append(pairs)
            self._hooks.append(block.register_forward_pre_hook(self._onload_hook(pairs)))
            self._hooks.append(block.register_forward_hook(self._offload_hook(pairs)))
        self.offloaded_bytes = sum(m.numel() * m.element_size() for pairs in self._masters for _, m in pairs)

    def _master(self, tensor: torch.Tensor) -> torch.Tensor:
        cpu = tensor.to("cpu")
        if self.pinned:
            try:
                return cpu.pin_memory()
            except RuntimeError as exc:  # e.g. a locked-memory limit: pageable memory, slower copies
                log.warning("could not pin the text encoder's CPU copy (%s): pageable copies", exc)
                self.pinned = False
        return cpu

    def _onload_hook(self, pairs):
        def onload(module, args):
            for p, master in pairs:
                p.data = master.to(self.device, non_blocking=self.pinned)
        return onload

    @staticmethod
    def _offload_hook(pairs):
        def offload(module, args, output):
            for p, master in pairs:
                p.data = master  # the GPU copy goes back to the allocator, reused by the next block
        return offload

    def remove(self) -> None:
        """Put the blocks back on the device for good (the resident placement) and drop the hooks."""
        for hook in self._hooks:
            hook.remove()
        for pairs in self._masters:
            for p, master in pairs:
                p.data = master.to(self.device)
        self._hooks, self._masters = [], []


def _repeated_blocks(module: torch.nn.Module):
    for child in module.children():
        if isinstance(child, torch.nn.ModuleList):
            yield from child
        else:
            yield from _repeated_blocks(child)


def _ships_unconditional(source: _ModelSource) -> bool:
    """Whether the checkpoint has an unconditional_transformer (a distilled one may not: its model_index.json
    leaves it out or names it null). Unreadable index: assume it does, and let `from_pretrained` say what is wrong."""
    try:
        index = source.model_index()
    except Exception:  # noqa: BLE001 - offline, gated, missing: from_pretrained reports it properly
        return True
    return any(index.get("unconditional_transformer") or ())


def _is_prequantized(source: _ModelSource) -> bool:
    return bool(source.read_component_config("transformer").get("quantization_config"))


def _nf4_config(source: _ModelSource, skip: tuple[str, ...] = ()):
    """NF4 on the fly for checkpoints that do not ship it; None for checkpoints that already do (loaded as is)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ModelConfigError("NF4 needs bitsandbytes: pip install 'letterpress[gpu]' (or bitsandbytes>=0.45)"
                               ) from exc
    if _is_prequantized(source):
        return None
    from diffusers.quantizers import PipelineQuantizationConfig

    return PipelineQuantizationConfig(
        quant_backend="bitsandbytes_4bit",
        quant_kwargs={"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": torch.bfloat16},
        components_to_quantize=[c for c in _NF4_COMPONENTS if c not in skip],
    )


def dequantize_linear4bit(model: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> int:
    """Replace every bitsandbytes `Linear4bit` in `model` by a plain `nn.Linear` holding its dequantized weight.

    Done once at load: the model keeps NF4's numbers (the weights are exactly what NF4 decodes to) but runs dense
    bf16 matmuls, which are faster than dequantizing at every step and compile cleanly. Only the two transformers
    are dequantized; the text encoder runs once a job and stays NF4 to save memory. Returns how many layers were
    replaced; a model that had any is marked unquantized, so diffusers treats it as the plain bf16 model it is.
    """
    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    replaced = _replace_linear4bit(model, bnb, dtype)
    if replaced:
        model.hf_quantizer = None
        model.is_quantized = False
        model.is_loaded_in_4bit = False
        model.quantization_method = None
    return replaced


def _replace_linear4bit(module: torch.nn.Module, bnb, dtype: torch.dtype) -> int:
    replaced = 0
    for name, child in list(module.named_children()):
        if isinstance(child, bnb.nn.Linear4bit):
            weight = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state)
            dense = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                    device=weight.device, dtype=dtype)
            dense.weight.data.copy_(weight.reshape(child.out_features, child.in_features))
            if child.bias is not None:
                dense.bias.data.copy_(child.bias.data)
            setattr(module, name, dense)
            replaced += 1
        else:
            replaced += _replace_linear4bit(child, bnb, dtype)
    return replaced


def quantize_pipeline(pipe: Ideogram4Pipeline, variant: str) -> None:
    """fp8 or int8 in both transformers' blocks, in place (the bench converts a whole pipeline this way)."""
    for name in _QUANTIZED_TRANSFORMERS:
        if getattr(pipe, name) is not None:
            _QUANTIZERS[variant](getattr(pipe, name))


def block_linear(module: torch.nn.Module, fqn: str) -> bool:
    """A linear layer of the repeated blocks (`layers.N...`): what fp8 quantizes."""
    return isinstance(module, torch.nn.Linear) and fqn.startswith("layers.")


def int8_block_linear(module: torch.nn.Module, fqn: str) -> bool:
    """A block linear whose input has a row per token: what int8 quantizes.

    Not `adaln_modulation`: its input is the per-sample timestep embedding, one row a sample, and `torch._int_mm`
    refuses fewer than 17 rows. Every other block linear (attention q/k/v/out, the SwiGLU w1/w2/w3) sees all text
    and image tokens: thousands of rows at any size the API accepts.
    """
    return block_linear(module, fqn) and fqn.rsplit(".", 1)[-1] != "adaln_modulation"


def _quantize_block_linears(transformer: torch.nn.Module, variant: str, make_config: Callable[[], Any],
                            filter_fn: Callable[[torch.nn.Module, str], bool], device: str | None = None) -> None:
    """Apply torchao's `make_config()` to the linears `filter_fn` accepts: what fp8 and int8 share.

    With `device`, each linear is moved there just before it is quantized and the rest of the model after
    (torchao's own option), so the bf16 weights pass through the GPU one layer at a time. Without torchao: a
    `ModelConfigError` saying what to install.
    """
    try:
        from torchao.quantization import quantize_

        config = make_config()
    except ImportError as exc:
        raise ModelConfigError(f"{variant} needs torchao: pip install 'letterpress[gpu]' (or torchao>=0.10)"
                               ) from exc
    quantize_(transformer, config, filter_fn=filter_fn, device=device)


def _quantize_fp8_model(transformer: torch.nn.Module, device: str | None = None) -> None:
    """torchao float8 dynamic activations x float8 weights, per-row scales, in the repeated blocks only.

    Approximate by nature (8-bit activations and weights). The embedders, the once-a-job text projection and the
    final layer stay bf16: they cost little and matter most for fidelity.
    """
    def config():
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

        return Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())

    _quantize_block_linears(transformer, "fp8", config, block_linear, device)


def _quantize_int8_model(transformer: torch.nn.Module, device: str | None = None) -> None:
    """torchao int8 dynamic activations (per token) x int8 weights (per channel), in the repeated blocks only.

    For GPUs without fp8 (Ampere's int8 tensor cores run at twice its bf16 rate; not measured here: no A100 was
    lent). Approximate like fp8, and bf16 where fp8 is, plus the per-sample adaLN projections (`int8_block_linear`).
    On Hopper `torch._int_mm` runs at the bf16 rate: 1.06x bf16 a step on the H200 (docs/PERFORMANCE.md).
    """
    def config():
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig

        return Int8DynamicActivationInt8WeightConfig()

    _quantize_block_linears(transformer, "int8", config, int8_block_linear, device)


_QUANTIZERS = {"fp8": _quantize_fp8_model, "int8": _quantize_int8_model}


def translate_load_error(exc: BaseException, *, model_id: str, variant: str, device_info: DeviceInfo | None = None,
                         offline: bool = False) -> ModelConfigError:
    """Turn a loading failure into a `ModelConfigError` saying what to do. Looks through the exception chain,
    because diffusers re-raises Hub errors as generic `OSError`s `from` the original."""
    chain = _exception_chain(exc)
    if _is_cuda_oom(chain):
        return ModelConfigError(_oom_message(model_id, variant, device_info))
    missing_package = next((e for e in chain if isinstance(e, ImportError)), None)
    if missing_package is not None:
        return ModelConfigError(
            f"loading {model_id} as {variant} needs a package that is not installed ({_short(missing_package)}): "
            "pip install 'letterpress[gpu]' (bitsandbytes for NF4, torchao for fp8 and int8)"
        )
    if _is_gated(chain):
        return ModelConfigError(
            f"{model_id} is gated on the Hugging Face Hub: accept the licence at https://huggingface.co/{model_id} "
            "and set HF_TOKEN (or LETTERPRESS_MODEL__HF_TOKEN) to a token of the account that accepted it"
        )
    if (offline and _is_missing(chain)) or _is_offline_refusal(chain):
        return ModelConfigError(
            f"{model_id} is not in the local Hugging Face cache and offline mode is on: unset HF_HUB_OFFLINE / "
            f"LETTERPRESS_MODEL__OFFLINE, or pre-download it (`hf download {model_id}`) into the cache "
            "(HF_HOME) this worker uses"
        )
    if _is_network(chain):
        return ModelConfigError(
            f"could not reach the Hugging Face Hub to fetch {model_id} and it is not fully cached: check the "
            "network or proxy, or pre-download it (`hf download ...`) and set LETTERPRESS_MODEL__OFFLINE=true "
            f"({_short(chain[-1])})"
        )
    if _is_missing(chain):
        return not_found_error(model_id, _short(chain[0]))
    return ModelConfigError(f"could not load {model_id!r} as {variant}: {_short(chain[0])}")


def not_found_error(model_id: str, detail: str) -> ModelConfigError:
    return ModelConfigError(
        f"model {model_id!r} not found: give a Hub id (e.g. {DEFAULT_HUB_MODEL}) or a local directory saved with "
        f"save_pretrained; build a tiny one with `letterpress model init-tiny PATH` ({detail})"
    )


def _exception_chain(exc: BaseException) -> list[BaseException]:
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    return chain


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _is_gated(chain: list[BaseException]) -> bool:
    from huggingface_hub.errors import GatedRepoError

    return any(isinstance(e, GatedRepoError) or _http_status(e) in (401, 403) for e in chain)


def _is_missing(chain: list[BaseException]) -> bool:
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HFValidationError,
        RepositoryNotFoundError,
    )

    missing = (RepositoryNotFoundError, EntryNotFoundError, HFValidationError, FileNotFoundError, OSError)
    return any(isinstance(e, missing) or _http_status(e) == 404 for e in chain)


def _is_offline_refusal(chain: list[BaseException]) -> bool:
    from huggingface_hub.errors import OfflineModeIsEnabled

    return any(isinstance(e, OfflineModeIsEnabled) for e in chain)


def _is_network(chain: list[BaseException]) -> bool:
    """Connection-level failures (httpx, requests and the standard library name them alike)."""
    names = ("ConnectError", "ConnectionError", "ConnectTimeout", "NetworkError", "ReadTimeout", "ProxyError")
    return any(type(e).__name__ in names or isinstance(e, (ConnectionError, TimeoutError)) for e in chain)


def _is_cuda_oom(chain: list[BaseException]) -> bool:
    return any(isinstance(e, torch.cuda.OutOfMemoryError) or "CUDA out of memory" in str(e) for e in chain)


def _oom_message(model_id: str, variant: str, device_info: DeviceInfo | None) -> str:
    gpu = "this GPU"
    if device_info is not None and device_info.kind == "cuda":
        gpu = f"{device_info.name} ({device_info.total_memory / 1e9:.0f} GB)"
    return (
        f"out of GPU memory loading {model_id} as {variant} on {gpu}. Ideogram 4 needs about 56 GB in bf16 (two "
        "9.3B transformers, 37 GB, plus the 8B text encoder, 17 GB; nf4-dequant and fp8 need about as much) and "
        "about 16 GB as nf4, which fits a 24 GB GPU: set LETTERPRESS_MODEL__VARIANT=nf4, or use a larger GPU"
    )


def _short(exc: BaseException, limit: int = 300) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 3] + "..."
