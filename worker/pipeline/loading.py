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
| `bf16`        | bfloat16, about 56 GB                               | default on GPUs with >= 64 GB      |
| `nf4`         | bitsandbytes NF4 as shipped, about 16 GB            | default on smaller GPUs; CUDA only |
| `nf4-dequant` | NF4 weights dequantized once to bf16 (transformers) | NF4's numbers at bf16 speed        |
| `fp8`         | torchao float8 rowwise in the transformer blocks    | explicit opt-in, sm_89+, approximate |
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from common.errors import ModelError
from common.settings import ModelSettings, Settings, get_settings, hf_env, hub_cache_dir
from worker.pipeline.spec import MAX_SEQUENCE_LENGTH

if TYPE_CHECKING:
    from diffusers import Ideogram4Pipeline

log = logging.getLogger(__name__)

VARIANTS = ("fp32", "bf16", "nf4", "nf4-dequant", "fp8")
DEFAULT_HUB_MODEL = "ideogram-ai/ideogram-4-nf4"
# bf16 by default only where it fits: `letterpress bench` measured 52-54 GB allocated at 1024² and 60-63 GB at
# 2048² (docs/PERFORMANCE.md, "Memory"), so a 48 GB card (the first guess) runs out; NF4 below this.
BF16_AUTO_MIN_MEMORY = 64 * 10**9
FP8_MIN_CAPABILITY = (8, 9)
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


def resolve_variant(requested: str, device_info: DeviceInfo) -> str:
    """The weight variant to load: "auto" picks by device, an explicit choice wins unless the device cannot run it.

    Pure function of its arguments. Raises `ModelConfigError` for unknown names and impossible choices.
    """
    variant = (requested or "auto").strip().lower()
    if variant == "auto":
        if device_info.kind == "cpu":
            return "fp32"
        return "bf16" if device_info.total_memory >= BF16_AUTO_MIN_MEMORY else "nf4"
    if variant not in VARIANTS:
        raise ModelConfigError(f"unknown model variant {requested!r}: choose one of auto, {', '.join(VARIANTS)}")
    if variant in ("nf4", "nf4-dequant") and device_info.kind != "cuda":
        raise ModelConfigError(
            f"variant {variant} needs bitsandbytes and a CUDA GPU, and this worker has none: "
            "use fp32 (or bf16, slower) on CPU"
        )
    if variant == "fp8":
        _check_fp8_capable(device_info)
    return variant


def _check_fp8_capable(device_info: DeviceInfo) -> None:
    supported = ("fp8 needs a GPU with fp8 tensor cores, compute capability 8.9 or newer: Ada (L4, L40S, RTX 4090), "
                 "Hopper (H100, H200, the tested target) or Blackwell (B200)")
    if device_info.kind != "cuda":
        raise ModelConfigError(f"{supported}; this worker has no CUDA GPU: use fp32 on CPU")
    cap = device_info.capability or (0, 0)
    if cap < FP8_MIN_CAPABILITY:
        raise ModelConfigError(
            f"{supported}; {device_info.name} is sm_{cap[0]}{cap[1]}: use bf16 or nf4 on this GPU"
        )


def dtype_for(variant: str) -> torch.dtype:
    """The compute dtype of a variant (NF4 and fp8 compute in bf16)."""
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

    `settings` is only consulted when `model.id` is empty (for the default model's home); it defaults to the
    process settings.
    """
    device_info = detect_device(device)
    variant = resolve_variant(model.variant, device_info)
    model_id = model.id
    if not model_id:
        base = settings or get_settings()
        model_id = default_model_id(base.model_copy(update={"model": model}), device_info)
    source = _ModelSource.from_settings(model_id, model)
    if source.local_dir is None and source.looks_local:
        raise not_found_error(model_id, "no such directory")
    try:
        pipe, variant = _load(source, variant, device_info)
    except ModelConfigError:
        raise
    except Exception as exc:
        raise translate_load_error(exc, model_id=model_id, variant=variant, device_info=device_info,
                                   offline=source.offline) from exc
    pipe.set_progress_bar_config(disable=True)
    return LoadedPipeline(pipe=pipe, device=device_info.torch_device, dtype=dtype_for(variant), variant=variant,
                          model_id=model_id, revision=source.resolved_revision(),
                          max_sequence_length=model.max_sequence_length)


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


def _load(source: _ModelSource, variant: str, device_info: DeviceInfo) -> tuple[Ideogram4Pipeline, str]:
    """Load, place on the device and convert to `variant`; returns the pipeline and the variant it really is."""
    from diffusers import Ideogram4Pipeline

    kwargs = dict(dtype=dtype_for(variant), **source.hub_kwargs())
    distilled = not _ships_unconditional(source)
    if distilled:  # a distilled checkpoint: CFG-free presets only (worker.pipeline.fast_path)
        kwargs["unconditional_transformer"] = None
    if variant in ("nf4", "nf4-dequant"):
        kwargs["quantization_config"] = _nf4_config(source, skip=("unconditional_transformer",) if distilled else ())
    pipe = Ideogram4Pipeline.from_pretrained(source.model_id, **kwargs)
    pipe.to(device_info.torch_device)
    if variant != "nf4":
        # bf16 and fp8 from a checkpoint that ships NF4 (the default Hub model) run NF4's numbers densely.
        dequantized = sum(dequantize_linear4bit(getattr(pipe, name)) for name in _QUANTIZED_TRANSFORMERS
                          if getattr(pipe, name) is not None)
        if dequantized and variant == "bf16":
            log.info("%s ships NF4 weights: dequantized them to bf16 (variant nf4-dequant)", source.model_id)
            variant = "nf4-dequant"
    if variant == "fp8":
        _quantize_fp8(pipe)
    return pipe, variant


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


def _quantize_fp8(pipe: Ideogram4Pipeline) -> None:
    """torchao float8 dynamic activations x float8 weights, per-row scales, in the repeated blocks only.

    Approximate by nature (8-bit activations and weights). The embedders, the once-a-job text projection and the
    final layer stay bf16: they cost little and matter most for fidelity.
    """
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            PerRow,
            quantize_,
        )
    except ImportError as exc:
        raise ModelConfigError("fp8 needs torchao: pip install 'letterpress[gpu]' (or torchao>=0.10)") from exc

    def in_blocks(module: torch.nn.Module, fqn: str) -> bool:
        return isinstance(module, torch.nn.Linear) and fqn.startswith("layers.")

    config = Float8DynamicActivationFloat8WeightConfig(granularity=PerRow())
    for name in _QUANTIZED_TRANSFORMERS:
        if getattr(pipe, name) is not None:
            quantize_(getattr(pipe, name), config, filter_fn=in_blocks)


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
            "pip install 'letterpress[gpu]' (bitsandbytes for NF4, torchao for fp8)"
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
