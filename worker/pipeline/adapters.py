"""LoRA adapters inside a loaded pipeline: which are loaded, which are active, and switching between them.

diffusers loads Ideogram 4 LoRAs into the conditional transformer only (`Ideogram4LoraLoaderMixin`, on peft); the
fast path calls that transformer's layers directly, and peft's LoRA layers wrap its Linear layers, so both
generation paths see an active adapter.

Two ways to hold adapters, chosen once per pipeline:

- **Eager** (no compile): each adapter is loaded under its own name (`lp_<sha256 prefix>`) at its own rank and
  targets, up to `resident` of them kept loaded (least recently used unloaded past that); a job activates its
  adapters with `set_adapters(names, scales)`. Switching between resident adapters loads nothing.
- **Hot-swap slots** (compiled blocks): before the first compile, `prepare_slots` enables peft's hot-swap for
  the largest rank and loads `slots` zero adapters ("slot0", ...) over every Linear layer of the transformer. A job's
  adapters are then copied *into* those slots (`load_lora_weights(..., hotswap=True)`) with the job's scale folded
  into `lora_B` and the unused slots zeroed, so the compiled graph never changes and nothing recompiles.

A job without adapters runs with LoRA disabled (`disable_lora`): the base model's own layers, at full speed. With
compile that is a second graph, compiled once at warm-up (`prepare_compiled`).

A file that cannot be loaded (a shape or key this model does not have) fails its job with `AdapterError` and is
unloaded again; the worker keeps serving.
"""
from __future__ import annotations

import logging
import re
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch

if TYPE_CHECKING:
    from diffusers import Ideogram4Pipeline

log = logging.getLogger(__name__)


class AdapterError(ValueError):
    """This job's adapter cannot be used; the job fails with this message, the worker keeps serving."""


@dataclass(frozen=True)
class LoraUse:
    """One adapter of a spec: its content (sha256), its weight, and where its file lies on this machine (found
    by the worker's file cache before generation; None while the spec is only compared for co-batching)."""

    sha256: str
    scale: float
    path: Path | None = None

    @property
    def identity(self) -> tuple[str, float]:
        return (self.sha256, self.scale)


class LoadedAdapters:
    """The adapter state of one pipeline (see the module docstring). Not thread-safe: one generation at a time
    per pipeline, as the worker runs them."""

    def __init__(self, pipe: Ideogram4Pipeline, *, resident: int = 4):
        self.pipe = pipe
        self.resident = resident
        self.switch_s = 0.0  # time spent loading or swapping adapters, for the benchmark
        self.loads = 0  # adapter files loaded into the transformer (eager) or into a slot (hot-swap)
        self.switches = 0  # activations that changed what is active
        self._loaded: OrderedDict[str, str] = OrderedDict()  # eager: sha256 -> adapter name, least recent first
        self._slots: list[tuple[str, float] | None] | None = None  # hot-swap: what each slot holds (None: zeros)
        self._slot_rank = 0
        self._linears: dict[str, tuple[int, int, torch.dtype]] | None = None  # hot-swap: the layers slots cover
        self._enabled = False
        self._active: tuple[tuple[str, float], ...] = ()
        self._frozen = False
        self.unavailable: str | None = None  # why this worker serves no adapters, when it cannot

    @property
    def active(self) -> tuple[tuple[str, float], ...]:
        """(sha256, scale) of the adapters the next forward pass applies; () when LoRA is off."""
        return self._active if self._enabled else ()

    @property
    def uses_slots(self) -> bool:
        return self._slots is not None

    # ---------------------------------------------------------------------------------------------- activation

    def activate(self, loras: tuple[LoraUse, ...]) -> None:
        """Make exactly `loras` active (none: LoRA off)."""
        if self._frozen:
            return
        if loras and self.unavailable:
            raise AdapterError(self.unavailable)
        wanted = tuple(lora.identity for lora in loras)
        if wanted == self.active:
            return
        t0 = time.perf_counter()
        if not loras:
            if self._enabled:
                self.pipe.disable_lora()
                self._enabled = False
        elif self._slots is not None:
            self._fill_slots(loras)
        else:
            self._activate_named(loras)
        self._active = wanted if loras else ()
        self.switches += 1
        self.switch_s += time.perf_counter() - t0

    def _activate_named(self, loras: tuple[LoraUse, ...]) -> None:
        names = [self._load_named(lora) for lora in loras]
        self._evict(keep=set(names))
        self._enable()
        self.pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])

    def _load_named(self, lora: LoraUse) -> str:
        name = self._loaded.get(lora.sha256)
        if name is not None:
            self._loaded.move_to_end(lora.sha256)
            return name
        name = f"lp_{lora.sha256[:16]}"
        try:
            self.pipe.load_lora_weights(str(_require_path(lora)), adapter_name=name)
        except Exception as exc:  # noqa: BLE001 - a bad file fails its job, not the worker
            self._unload(name)
            raise AdapterError(f"adapter {lora.sha256[:12]} cannot be loaded into this model: {_short(exc)}") from exc
        self.loads += 1
        self._loaded[lora.sha256] = name
        return name

    def _evict(self, keep: set[str]) -> None:
        for sha256, name in list(self._loaded.items()):
            if len(self._loaded) <= self.resident:
                break
            if name not in keep:
                self._unload(name)
                del self._loaded[sha256]

    def _unload(self, name: str) -> None:
        if name in getattr(self.pipe.transformer, "peft_config", {}):
            self.pipe.delete_adapters(name)

    def _enable(self) -> None:
        if not self._enabled:
            self.pipe.enable_lora()
            self._enabled = True

    # ------------------------------------------------------------------------------------------ hot-swap slots

    def prepare_slots(self, *, slots: int, rank: int) -> None:
        """Hot-swap mode: call before the transformer is compiled. Loads `slots` zero adapters of `rank` over every
        Linear layer of the conditional transformer."""
        if self._slots is not None or self._loaded:
            raise RuntimeError("prepare_slots must come before any adapter is loaded")
        self.pipe.enable_lora_hotswap(target_rank=rank)
        try:
            for i in range(slots):
                self.pipe.load_lora_weights(self._zeros(rank), adapter_name=f"slot{i}")
        except BaseException:
            for i in range(slots):
                self._unload(f"slot{i}")
            raise
        # every slot active at weight 1 for good (each load made only itself active); scales live in lora_B
        self.pipe.set_adapters([f"slot{i}" for i in range(slots)], adapter_weights=[1.0] * slots)
        self._slots = [None] * slots
        self._slot_rank = rank
        self.pipe.disable_lora()
        self._enabled = False

    def _zeros(self, rank: int) -> dict[str, torch.Tensor]:
        """A rank-`rank` adapter of zeros over every Linear layer the transformer had before LoRA wrapped them."""
        if self._linears is None:  # a layer peft wrapped before (adapters loaded and deleted) is its base_layer
            self._linears = {name.removesuffix(".base_layer"): (m.in_features, m.out_features, m.weight.dtype)
                             for name, m in self.pipe.transformer.named_modules()
                             if isinstance(m, torch.nn.Linear) and not re.search(r"\.lora_[A-Za-z]+\.", name)}
        state = {}
        for name, (in_features, out_features, dtype) in self._linears.items():
            state[f"transformer.{name}.lora_A.weight"] = torch.zeros(rank, in_features, dtype=dtype)
            state[f"transformer.{name}.lora_B.weight"] = torch.zeros(out_features, rank, dtype=dtype)
        return state

    def _fill_slots(self, loras: tuple[LoraUse, ...]) -> None:
        assert self._slots is not None
        if len(loras) > len(self._slots):
            raise AdapterError(f"this worker holds at most {len(self._slots)} adapters a job")
        wanted: list[tuple[str, float] | None] = [lora.identity for lora in loras]
        wanted += [None] * (len(self._slots) - len(wanted))
        by_identity = {lora.identity: lora for lora in loras}
        for i, (have, want) in enumerate(zip(self._slots, wanted)):
            if have == want:
                continue
            self._slots[i] = None  # until the copy is complete: a failed swap leaves zeros, never half of one
            if want is None:
                self._zero_in_place(i)
                continue
            state = self._scaled_state(by_identity[want])
            try:  # peft zeroes the slot's layers the new adapter does not target
                self.pipe.load_lora_weights(state, adapter_name=f"slot{i}", hotswap=True)
            except Exception as exc:  # noqa: BLE001 - a bad file fails its job, not the worker
                self._zero_slot(i)
                raise AdapterError(f"adapter {want[0][:12] if want else ''} cannot be swapped into this worker's "
                                   f"slots (rank at most {self._slot_rank}, Linear layers of this model): "
                                   f"{_short(exc)}") from exc
            self._slots[i] = want
            self.loads += want is not None
        self._enable()

    @torch.no_grad()
    def _zero_in_place(self, i: int) -> None:
        """Empty slot `i` without loading anything: its lora_A and lora_B weights zeroed where they lie (a zero
        lora_B alone makes the slot add nothing; both keep it clean)."""
        name = f"slot{i}"
        for module in self.pipe.transformer.modules():
            for part in ("lora_A", "lora_B"):
                layers = getattr(module, part, None)
                if isinstance(layers, torch.nn.ModuleDict) and name in layers:
                    layers[name].weight.zero_()

    def _zero_slot(self, i: int) -> None:
        """After a failed swap: zeros again, or (should even that fail) no adapters on this worker any more."""
        try:
            self._zero_in_place(i)
        except Exception as exc:  # noqa: BLE001
            self.unavailable = f"adapter slot {i} is in an unknown state after a failed swap ({_short(exc)})"
            log.error("%s: serving jobs without adapters only", self.unavailable)
            self.activate(())

    def _scaled_state(self, lora: LoraUse) -> dict[str, torch.Tensor]:
        """The file's state dict in diffusers' layout with `scale` folded into lora_B (a scale change must not
        change the compiled graph)."""
        try:
            state = self.pipe.lora_state_dict(str(_require_path(lora)))
        except Exception as exc:  # noqa: BLE001
            raise AdapterError(f"adapter {lora.sha256[:12]} cannot be read: {_short(exc)}") from exc
        return {k: v * lora.scale if ".lora_B." in k else v for k, v in state.items()}

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """Generate with the adapters exactly as they are (the compile warm-up of the LoRA-on graph)."""
        self._frozen = True
        try:
            yield
        finally:
            self._frozen = False

    def enable_slots_for_warmup(self) -> None:
        """Hot-swap mode: turn the (zero) slots on, so a warm-up compiles the LoRA-on graph."""
        if self._slots is not None:
            self._enable()
            self._active = tuple(("0" * 64, 0.0) for _ in self._slots)


def _require_path(lora: LoraUse) -> Path:
    if lora.path is None:
        raise AdapterError(f"adapter {lora.sha256[:12]} has no local file (the worker fetches it before use)")
    return lora.path


def _short(exc: BaseException, limit: int = 300) -> str:
    text = (str(exc).splitlines() or [type(exc).__name__])[0]
    return text[:limit]


def adapters_of(loaded) -> LoadedAdapters:
    """The adapter state of a loaded pipeline (`LoadedPipeline.adapters`), made on first use."""
    if loaded.adapters is None:
        loaded.adapters = LoadedAdapters(loaded.pipe)
    return loaded.adapters
