"""LoRA adapters inside the pipeline (worker/pipeline/adapters.py), tiny model on the CPU with LoRA files made
by peft: an adapter changes the image, switching back gives the base model's exact bytes, the same adapter and
seed give the same bytes, a bad file fails only its own generation, and with compiled blocks adapters swap into
the hot-swap slots without a single recompile."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.tiny_loras import lora_state, tiny_transformer, write_lora
from tests.worker.pipeline.tiny_pipeline import image_bytes, load_tiny, make_spec
from worker.pipeline.adapters import AdapterError, LoraUse, adapters_of
from worker.pipeline.fast_path import generate_batch, prepare_compiled
from worker.pipeline.generation import generate
from worker.pipeline.spec import co_batch_key


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("adapters-model")
    load_tiny(directory)  # builds it
    return directory / "tiny"


@pytest.fixture(scope="module")
def loras(model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("loras")
    transformer = tiny_transformer(model_dir)
    return {
        "a": write_lora(out / "a.safetensors", transformer, seed=1),
        "b": write_lora(out / "b.safetensors", transformer, rank=8, targets=("to_q", "to_v", "w1"), seed=2),
        "c": write_lora(out / "c.safetensors", transformer, rank=2, targets=("w2",), seed=3),
    }


def use(loras, name: str, scale: float = 1.0) -> LoraUse:
    return LoraUse(sha256=name * 64, scale=scale, path=loras[name])


def with_loras(spec, *uses):
    return dataclasses.replace(spec, loras=tuple(uses))


@pytest.fixture()
def loaded(model_dir):
    return load_tiny(model_dir.parent)


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "stock"])
def test_an_adapter_changes_the_image_and_off_is_the_base_model_bit_for_bit(loaded, loras, fast):
    spec = make_spec(seeds=(5,))
    base = image_bytes(generate(loaded, spec, fast=fast))
    with_a = image_bytes(generate(loaded, with_loras(spec, use(loras, "a")), fast=fast))
    again = image_bytes(generate(loaded, with_loras(spec, use(loras, "a")), fast=fast))
    off = image_bytes(generate(loaded, spec, fast=fast))
    assert with_a != base
    assert again == with_a
    assert off == base


def test_scale_two_adapters_and_order_of_switches(loaded, loras):
    spec = make_spec(seeds=(7,))
    a1 = image_bytes(generate(loaded, with_loras(spec, use(loras, "a"))))
    a_half = image_bytes(generate(loaded, with_loras(spec, use(loras, "a", 0.5))))
    ab = image_bytes(generate(loaded, with_loras(spec, use(loras, "a"), use(loras, "b"))))
    b = image_bytes(generate(loaded, with_loras(spec, use(loras, "b"))))
    a2 = image_bytes(generate(loaded, with_loras(spec, use(loras, "a"))))
    assert len({a1[0], a_half[0], ab[0], b[0]}) == 4
    assert a2 == a1  # after other adapters were active: the same bytes
    state = adapters_of(loaded)
    assert state.loads == 2  # a and b loaded once each: switching between resident adapters loads nothing


def test_the_resident_bound_unloads_the_least_recently_used(loaded, loras):
    state = adapters_of(loaded)
    state.resident = 2
    spec = make_spec(seeds=(1,), steps=1)
    for name in ("a", "b", "c"):
        generate(loaded, with_loras(spec, use(loras, name)))
    assert set(loaded.pipe.transformer.peft_config) == {f"lp_{'b' * 16}", f"lp_{'c' * 16}"}
    generate(loaded, with_loras(spec, use(loras, "a")))  # reloaded
    assert state.loads == 4


def test_a_file_for_another_model_fails_its_generation_and_the_pipeline_keeps_serving(loaded, loras, tmp_path):
    from safetensors.torch import save_file

    bad_state = {k: (torch.zeros(4, 999) if k.endswith("to_q.lora_A.weight") else v)
                 for k, v in lora_state(loaded.pipe.transformer).items()}
    save_file(bad_state, str(tmp_path / "bad.safetensors"))
    spec = make_spec(seeds=(3,))
    base = image_bytes(generate(loaded, spec))
    bad = LoraUse(sha256="f" * 64, scale=1.0, path=tmp_path / "bad.safetensors")
    with pytest.raises(AdapterError, match="cannot be loaded"):
        generate(loaded, with_loras(spec, bad))
    assert "lp_" + "f" * 16 not in getattr(loaded.pipe.transformer, "peft_config", {})
    assert image_bytes(generate(loaded, spec)) == base
    assert image_bytes(generate(loaded, with_loras(spec, use(loras, "a")))) != base


def test_specs_with_other_adapters_never_share_a_pass():
    spec = make_spec()
    a = with_loras(spec, LoraUse("a" * 64, 1.0))
    assert co_batch_key(a) != co_batch_key(spec)
    assert co_batch_key(a) != co_batch_key(with_loras(spec, LoraUse("a" * 64, 0.5)))
    assert co_batch_key(a) == co_batch_key(with_loras(make_spec(prompt="other"), LoraUse("a" * 64, 1.0, None)))


def test_hot_swap_slots_switch_adapters_without_recompiling(model_dir, loras):
    """Compiled blocks (CPU inductor): after the warm-up, jobs without adapters, with a, with b, with a and c,
    at other scales, compile nothing (torch._dynamo's counters), and match the eager path's images closely."""
    from torch._dynamo.utils import counters

    from worker.bench.models import uncompile

    eager = load_tiny(model_dir.parent)
    spec = make_spec(seeds=(9,), width=32, height=32, steps=2)
    jobs = [(), (use(loras, "a"),), (use(loras, "b", 0.7),), (use(loras, "a"), use(loras, "c")), (),
            (use(loras, "a"),)]
    expected = [generate(eager, with_loras(spec, *uses))[0] for uses in jobs]

    loaded = load_tiny(model_dir.parent)
    state = adapters_of(loaded)
    state.prepare_slots(slots=2, rank=8)
    torch._dynamo.reset()  # other tests in this process compiled the same block code: no stale cache entries
    try:
        prepare_compiled(loaded, warmup_sizes=[(32, 32)], warmup_steps=1)
        graphs = counters["stats"]["unique_graphs"]
        images = [generate_batch(loaded, [with_loras(spec, *uses)])[0][0] for uses in jobs]
        assert counters["stats"]["unique_graphs"] == graphs, "an adapter switch recompiled the blocks"
    finally:
        uncompile(loaded.pipe)
    for got, want in zip(images, expected):
        diff = int(np.abs(np.asarray(got, dtype=np.int16) - np.asarray(want, dtype=np.int16)).max())
        assert diff <= 2, diff  # compiled kernels round differently; the adapter itself is the same
    assert image_bytes([images[0]]) != image_bytes([images[1]])
    assert image_bytes([images[1]]) == image_bytes([images[5]])  # a, then others, then a again: same bytes
    assert image_bytes([images[0]]) == image_bytes([images[4]])  # off: the base graph, same bytes
    with pytest.raises(AdapterError, match="at most 2"):
        generate_batch(loaded, [with_loras(spec, use(loras, "a"), use(loras, "b"), use(loras, "c"))])
