"""LoRA files for the tiny model, made with peft in the tests (no adapter can be downloaded here): the layout
diffusers' `save_lora_weights` writes, and an ai-toolkit style file (`diffusion_model.` keys, fused qkv)."""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from safetensors.torch import save_file

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")


def tiny_transformer(model_dir: Path):
    from diffusers import Ideogram4Transformer2DModel

    return Ideogram4Transformer2DModel.from_pretrained(str(model_dir), subfolder="transformer")


def lora_state(transformer, *, rank: int = 4, targets: tuple[str, ...] = ATTENTION, seed: int = 1,
               magnitude: float = 1.0) -> dict[str, torch.Tensor]:
    """A random LoRA (both A and B non-zero, so it changes the output) in diffusers' key layout."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets), init_lora_weights=False)
    model = inject_adapter_in_model(config, copy.deepcopy(transformer), adapter_name="default")
    state = get_peft_model_state_dict(model, adapter_name="default")
    return {f"transformer.{k}": (v * magnitude).contiguous() for k, v in state.items()}


def write_lora(path: Path, transformer, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(lora_state(transformer, **kwargs), str(path), metadata={"modelspec.architecture": "ideogram-4/lora"})
    return path


def write_ai_toolkit_lora(path: Path, transformer, *, rank: int = 4, seed: int = 3) -> Path:
    """The ai-toolkit layout diffusers converts at load: `diffusion_model.` prefix, one fused qkv pair a layer."""
    torch.manual_seed(seed)
    state = {}
    for i, layer in enumerate(transformer.layers):
        hidden = layer.attention.to_q.in_features
        state[f"diffusion_model.layers.{i}.attention.qkv.lora_A.weight"] = torch.randn(rank, hidden) * 0.1
        state[f"diffusion_model.layers.{i}.attention.qkv.lora_B.weight"] = torch.randn(3 * hidden, rank) * 0.1
    save_file(state, str(path))
    return path
