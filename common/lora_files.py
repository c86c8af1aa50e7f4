"""What a LoRA file is, read before anything is stored: a safetensors file whose tensors are LoRA pairs for
Linear layers of this model's conditional transformer, with shapes that fit them.

The check runs the file's layout through the loader diffusers itself uses (`Ideogram4Pipeline.lora_state_dict`,
which also converts the ai-toolkit / kohya layouts: `diffusion_model.` prefix, fused `attention.qkv`,
`lora_down`/`lora_up` with `.alpha`), on meta tensors: no weight is read except the scalar alphas, so a large
file costs its header. The target shapes come from the model's own class built on the meta device from the
configured checkpoint's `transformer/config.json` (a local directory, or a Hub id already in the local cache, never
downloaded): the Linear layers a LoRA can wrap and their (in, out) features.

Only safetensors are accepted: a pickle (`.bin`, `.pt`) can run code when loaded and is refused by its first
bytes.

`check_for_model` (what a registration calls) runs the check in a helper process, started on the first call and
kept: the check imports torch and diffusers, about 4 s of work that holds the GIL, which stalled the API process's
event loop up to a quarter of a second at a time, and about 320 MB that the thin front door would keep for good
(measured: /healthz max 225–251 ms during a first registration, the API's RSS 148 → 471 MB).
"""
from __future__ import annotations

import functools
import json
import logging
import multiprocessing
import os
import re
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

from common.errors import ServiceUnavailable
from common.settings import ModelSettings, hub_cache_dir

log = logging.getLogger(__name__)

SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own bound on the JSON header
_PAIR = re.compile(r"^(?:transformer\.)?(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")
# The first bytes of a pickle (protocol 2+) or of a zip archive (torch.save's default format).
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")


class NotALora(ValueError):
    """The file is refused; the message says why, for the caller."""


@dataclass(frozen=True)
class LoraFileInfo:
    rank: int  # the largest rank of any pair (what a hot-swap slot must hold)
    target_modules: tuple[str, ...]  # module names without the layer index: ("attention.to_q", "feed_forward.w1")
    layers: int  # Linear layers the adapter wraps
    tensors: int
    layout: str  # "diffusers" (peft keys) or "converted" (ai-toolkit / kohya, converted by diffusers at load)
    base_model: str | None  # what the file's metadata names, when it does (`modelspec.architecture`, ...)


def check_not_pickle(first_bytes: bytes) -> None:
    if first_bytes.startswith(_PICKLE_MAGIC):
        raise NotALora("the file is a pickle or a torch zip archive, which can run code when loaded; convert it "
                       "to .safetensors (safetensors.torch.save_file)")


CHECK_TIMEOUT_S = 300.0  # a helper that takes longer is stuck: it is replaced and the caller told to retry
_helper: ProcessPoolExecutor | None = None
_helper_lock = threading.Lock()


def check_for_model(path: Path, model: ModelSettings) -> LoraFileInfo:
    """inspect_lora of `path` against `model`'s Linear layers (transformer_linear_shapes), in the helper process
    (module doc). Raises NotALora; ServiceUnavailable when the helper died twice or got stuck."""
    try:
        return _in_helper(path, model)
    except BrokenProcessPool:  # the helper died (killed, out of memory): once more, in a new one
        pass
    try:
        return _in_helper(path, model)
    except BrokenProcessPool:
        raise ServiceUnavailable("the adapter check's helper process died twice; retry later") from None


def _in_helper(path: Path, model: ModelSettings) -> LoraFileInfo:
    helper = _helper_process()
    try:
        return helper.submit(_check, str(path), model).result(timeout=CHECK_TIMEOUT_S)
    except BrokenProcessPool:
        _drop_helper(helper)
        raise
    except FutureTimeout:
        _drop_helper(helper)
        raise ServiceUnavailable(f"the adapter check took over {CHECK_TIMEOUT_S:g} s; retry later") from None


def _check(path: str, model: ModelSettings) -> LoraFileInfo:
    return inspect_lora(Path(path), transformer_linear_shapes(model))


def _helper_process() -> ProcessPoolExecutor:
    global _helper
    with _helper_lock:
        if _helper is None:  # spawned, not forked: the API process has threads (a fork may copy a held lock)
            _helper = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                          initializer=_exit_with_parent, initargs=(os.getpid(),))
        return _helper


def _exit_with_parent(parent: int) -> None:
    """The helper's initializer: it ends when the process that started it is gone. A pool's worker otherwise
    outlives a parent that ended without its exit handlers (a SIGTERMed server, a kill), blocked for good on a
    queue whose both ends it holds."""
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _drop_helper(helper: ProcessPoolExecutor) -> None:
    global _helper
    with _helper_lock:
        if _helper is helper:
            _helper = None
    for process in list((getattr(helper, "_processes", None) or {}).values()):
        process.kill()  # a stuck helper does not end by itself
    helper.shutdown(wait=False, cancel_futures=True)


def inspect_lora(path: Path, linear_shapes: Mapping[str, tuple[int, int]] | None) -> LoraFileInfo:
    """Read `path`'s header and check it as a LoRA for a transformer whose Linear layers have `linear_shapes`
    ({module name: (in_features, out_features)}); None skips the shape check (no model config here: the worker
    checks at load). Raises NotALora."""
    with open(path, "rb") as f:
        check_not_pickle(f.read(8))
    tensors, metadata = _read_header(path)
    if not tensors:
        raise NotALora("the file holds no tensors")
    state_dict, layout = _as_diffusers_layout(path, tensors)
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, tensor in state_dict.items():
        match = _PAIR.match(key)
        if match is None:
            raise NotALora(f"tensor {key!r} is not a LoRA weight (expected `<module>.lora_A.weight` and "
                           "`<module>.lora_B.weight` pairs)")
        pairs.setdefault(match["module"], {})[match["part"]] = tuple(tensor.shape)
    rank = 0
    for module, parts in sorted(pairs.items()):
        if set(parts) != {"A", "B"}:
            raise NotALora(f"module {module!r} has lora_{'A' if 'A' in parts else 'B'} without its pair")
        a, b = parts["A"], parts["B"]
        if len(a) != 2 or len(b) != 2 or a[0] != b[1] or a[0] < 1:
            raise NotALora(f"module {module!r}: lora_A {list(a)} and lora_B {list(b)} are not a rank-r pair")
        if linear_shapes is not None:
            if module not in linear_shapes:
                raise NotALora(f"module {module!r} is not a Linear layer of this model's transformer")
            in_features, out_features = linear_shapes[module]
            if a[1] != in_features or b[0] != out_features:
                raise NotALora(f"module {module!r} is {in_features}->{out_features} in this model; the LoRA is "
                               f"{a[1]}->{b[0]} (made for another model?)")
        rank = max(rank, a[0])
    targets = tuple(sorted({re.sub(r"^layers\.\d+\.", "", m) for m in pairs}))
    return LoraFileInfo(rank=rank, target_modules=targets, layers=len(pairs), tensors=len(tensors), layout=layout,
                        base_model=_base_model(metadata))


def _read_header(path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """{name: {"dtype", "shape"}} and `__metadata__`, checked by the safetensors library itself."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {}
            for name in f.keys():
                view = f.get_slice(name)
                tensors[name] = {"dtype": view.get_dtype(), "shape": tuple(view.get_shape())}
    except (SafetensorError, OSError, ValueError) as exc:
        raise NotALora(f"not a safetensors file ({_first_line(exc)})") from None
    return tensors, metadata


def _as_diffusers_layout(path: Path, tensors: dict[str, dict]) -> tuple[dict, str]:
    """The state dict diffusers would load, as meta tensors (scalar `.alpha` values read for real)."""
    import torch
    from diffusers import Ideogram4Pipeline
    from safetensors import safe_open

    meta = {}
    with safe_open(str(path), framework="pt") as f:
        for name, t in tensors.items():
            meta[name] = f.get_tensor(name) if name.endswith(".alpha") else torch.empty(t["shape"], device="meta")
    before = set(meta)
    try:
        converted = Ideogram4Pipeline.lora_state_dict(dict(meta))
    except Exception as exc:  # noqa: BLE001 - the converter's own complaint about a layout it cannot read
        raise NotALora(f"diffusers cannot read this LoRA layout ({type(exc).__name__}: {_first_line(exc)})") from None
    return converted, "diffusers" if set(converted) == before else "converted"


def _base_model(metadata: Mapping[str, str]) -> str | None:
    for key in ("modelspec.architecture", "ss_base_model_version", "base_model"):
        if metadata.get(key):
            return str(metadata[key])[:200]
    return None


def _first_line(exc: BaseException) -> str:
    return (str(exc).splitlines() or [type(exc).__name__])[0][:200]


# ------------------------------------------------------------------------------------------ the model's layers

def transformer_linear_shapes(model: ModelSettings) -> dict[str, tuple[int, int]] | None:
    """{module name: (in, out)} of every Linear of the configured model's transformer; None when its config is
    not on this machine (an empty model id, or a Hub id not in the local cache)."""
    return _linear_shapes(model.id, model.revision, model.hf_home)


@functools.lru_cache(maxsize=4)
def _linear_shapes(model_id: str, revision: str | None, hf_home: str | None) -> dict[str, tuple[int, int]] | None:
    config = _transformer_config(model_id, revision, hf_home)
    if config is None:
        return None
    import torch
    from diffusers import Ideogram4Transformer2DModel

    with torch.device("meta"):
        transformer = Ideogram4Transformer2DModel.from_config(config)
    return {name: (m.in_features, m.out_features) for name, m in transformer.named_modules()
            if isinstance(m, torch.nn.Linear)}


def _transformer_config(model_id: str, revision: str | None, hf_home: str | None) -> dict | None:
    if not model_id:
        log.warning("LETTERPRESS_MODEL__ID is empty: LoRA shapes are checked by the worker at load, not at "
                    "registration")
        return None
    root = Path(model_id).expanduser()
    try:
        if not root.is_dir():  # a Hub id: only what the local cache holds, never a download
            from huggingface_hub import hf_hub_download

            model = ModelSettings(id=model_id, revision=revision, hf_home=hf_home)
            return json.loads(Path(hf_hub_download(model_id, "transformer/config.json", revision=revision,
                                                   cache_dir=hub_cache_dir(model),
                                                   local_files_only=True)).read_text())
        return json.loads((root / "transformer" / "config.json").read_text())
    except Exception as exc:  # noqa: BLE001 - the registry keeps working; the worker checks at load
        log.warning("no transformer config for %s (%s): LoRA shapes are checked by the worker at load", model_id,
                    exc)
        return None
