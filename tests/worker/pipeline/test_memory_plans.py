"""Memory plans: the auto choice per GPU class and size, explicit variants placed or refused (pure, on CPU, from the
measured table in worker.pipeline.memory_plans), and the offloaded text encoder on the tiny model."""
from __future__ import annotations

import pytest
import torch

from common.devstack.tiny_model import build_tiny_model
from common.settings import ModelSettings
from worker.pipeline import memory_plans
from worker.pipeline.fast_path import _text_features, _tokenize
from worker.pipeline.loading import (
    DeviceInfo,
    ModelConfigError,
    TextEncoderOffload,
    load_pipeline,
    resolve_plan,
    resolve_variant,
)

GB = 10**9
AMPERE, HOPPER = (8, 0), (9, 0)
PX_1024, PX_2048 = 1024 * 1024, 2048 * 2048


def gpu(gb: float, capability: tuple[int, int], name: str = "test GPU") -> DeviceInfo:
    return DeviceInfo(kind="cuda", total_memory=int(gb * GB), capability=capability, name=name)


# (GB, capability, pixels) -> (variant, text encoder) or None (nothing measured fits)
AUTO = [
    (24, AMPERE, PX_1024, ("nf4", "resident")),
    (24, AMPERE, PX_2048, None),
    (24, HOPPER, PX_1024, ("nf4", "resident")),  # auto never picks the approximate fp8
    (24, HOPPER, PX_2048, None),
    (40, AMPERE, PX_1024, ("nf4", "resident")),  # dense transformers alone are 34.6 GiB
    (40, AMPERE, PX_2048, ("nf4", "resident")),
    (40, HOPPER, PX_1024, ("nf4", "resident")),
    (40, HOPPER, PX_2048, ("nf4", "resident")),
    (48, AMPERE, PX_1024, ("bf16", "offload")),
    (48, AMPERE, PX_2048, ("nf4", "resident")),
    (48, HOPPER, PX_1024, ("bf16", "offload")),
    (48, HOPPER, PX_2048, ("nf4", "resident")),
    (80, AMPERE, PX_1024, ("bf16", "resident")),
    (80, AMPERE, PX_2048, ("bf16", "resident")),
    (80, HOPPER, PX_1024, ("bf16", "resident")),
    (80, HOPPER, PX_2048, ("bf16", "resident")),
    (141, AMPERE, PX_1024, ("bf16", "resident")),
    (141, AMPERE, PX_2048, ("bf16", "resident")),
    (141, HOPPER, PX_1024, ("bf16", "resident")),
    (141, HOPPER, PX_2048, ("bf16", "resident")),
]


@pytest.mark.parametrize("gb, capability, pixels, expected", AUTO)
def test_auto_choice_per_gpu_class(gb, capability, pixels, expected):
    plan = memory_plans.choose(gb * GB, capability, pixels)
    assert (plan and (plan.variant, plan.text_encoder)) == (expected or None)
    if plan is not None:
        assert plan.need_bytes <= gb * GB
        assert plan.side == (1024 if pixels == PX_1024 else 2048)


@pytest.mark.parametrize("gb, capability, pixels, expected", [case for case in AUTO if case[3] is not None])
def test_resolve_auto_loads_the_chosen_plan(gb, capability, pixels, expected):
    plan = resolve_plan("auto", gpu(gb, capability), max_pixels=pixels)
    assert (plan.variant, plan.text_encoder) == expected
    assert resolve_variant("AUTO", gpu(gb, capability), max_pixels=pixels) == expected[0]


def test_auto_refuses_when_nothing_fits_naming_the_smallest_plan():
    with pytest.raises(ModelConfigError) as refused:
        resolve_plan("auto", gpu(24, AMPERE, "NVIDIA L4"), max_pixels=PX_2048)
    message = str(refused.value)
    assert "no measured memory plan fits NVIDIA L4 (24.0 GB)" in message
    assert "variant nf4 with the text encoder offloaded" in message  # the smallest: 23.35 GiB + headroom
    assert "LETTERPRESS_API__MAX_WIDTH" in message


def test_a_slightly_larger_card_fits_what_the_class_does_not():
    """The chooser reads the device's own total: an RTX 4090 reports 23.99 GiB, more than the 24e9-byte class."""
    plan = resolve_plan("auto", gpu(23.99 * 2**30 / GB, (8, 9), "NVIDIA GeForce RTX 4090"), max_pixels=PX_2048)
    assert (plan.variant, plan.text_encoder) == ("nf4", "offload")


@pytest.mark.parametrize(
    "requested, device, pixels, expected",
    [
        ("bf16", gpu(80, AMPERE), PX_2048, ("bf16", "resident")),
        ("bf16", gpu(48, AMPERE), PX_1024, ("bf16", "offload")),  # resident needs 56.5 GiB
        ("fp8", gpu(40, HOPPER), PX_2048, ("fp8", "offload")),
        ("nf4-dequant", gpu(48, AMPERE), PX_1024, ("nf4-dequant", "offload")),
        ("nf4", gpu(24, AMPERE), PX_1024, ("nf4", "resident")),
        ("nf4", gpu(141, HOPPER), PX_2048, ("nf4", "resident")),  # explicit wins over the faster fp8
    ],
)
def test_explicit_variant_gets_the_placement_that_fits(requested, device, pixels, expected):
    plan = resolve_plan(requested, device, max_pixels=pixels)
    assert (plan.variant, plan.text_encoder) == expected


@pytest.mark.parametrize(
    "requested, device, pixels, fragments",
    [
        ("bf16", gpu(40, AMPERE, "NVIDIA A100-SXM4-40GB"), PX_1024,
         ["variant bf16 does not fit NVIDIA A100-SXM4-40GB (40.0 GB)", "even with the text encoder offloaded",
          "variant nf4 with the text encoder resident on the GPU", "LETTERPRESS_MODEL__VARIANT=nf4"]),
        ("bf16", gpu(48, AMPERE), PX_2048,
         ["variant bf16 does not fit", "of up to 4,194,304 pixels", "LETTERPRESS_MODEL__VARIANT=nf4",
          "at up to 2048x2048"]),
        ("fp8", gpu(24, (8, 9), "NVIDIA L4"), PX_1024,
         ["variant fp8 does not fit NVIDIA L4", "LETTERPRESS_MODEL__VARIANT=nf4"]),
        ("nf4-dequant", gpu(40, HOPPER), PX_2048,
         ["variant nf4-dequant does not fit", "variant nf4 with the text encoder resident",
          "LETTERPRESS_MODEL__VARIANT=nf4"]),  # what auto would take: never the approximate fp8
        ("nf4", gpu(24, AMPERE), PX_2048, ["variant nf4 does not fit", "no measured memory plan fits"]),
    ],
)
def test_explicit_variant_that_cannot_fit_is_refused_naming_the_plan_that_would(requested, device, pixels,
                                                                                  fragments):
    with pytest.raises(ModelConfigError) as refused:
        resolve_plan(requested, device, max_pixels=pixels)
    for fragment in fragments:
        assert fragment in str(refused.value)


def test_sizes_between_measured_ones_use_the_larger_row_and_beyond_them_auto_refuses():
    a6000 = gpu(48, (8, 6))
    assert resolve_plan("auto", a6000, max_pixels=768 * 768).text_encoder == "offload"  # the 1024² row: bf16
    assert resolve_plan("auto", a6000, max_pixels=1536 * 1536).variant == "nf4"  # the 2048² row
    assert resolve_plan("auto", a6000, max_pixels=2048 * 1024).variant == "nf4"  # pixels, not sides, count
    with pytest.raises(ModelConfigError, match="no memory plan is measured for images over"):
        resolve_plan("auto", a6000, max_pixels=4096 * 4096)
    unchecked = resolve_plan("bf16", a6000, max_pixels=4096 * 4096)  # explicit: loaded, with a warning
    assert (unchecked.variant, unchecked.need_bytes) == ("bf16", 0)


def test_fp8_only_where_fp8_tensor_cores_are():
    assert memory_plans.variants_for((8, 0)) == ("bf16", "nf4-dequant", "nf4")
    assert memory_plans.variants_for((8, 6))[0] == "bf16"
    assert memory_plans.variants_for((8, 9))[0] == "bf16"  # auto: exact variants only
    assert memory_plans.variants_for((8, 9), approximate=True)[0] == "fp8"  # Ada: L4, L40S, RTX 4090
    assert memory_plans.variants_for((8, 0), approximate=True)[:2] == ("int8", "bf16")  # no fp8 tensor cores
    assert memory_plans.variants_for(None)[0] == "bf16"
    with pytest.raises(ModelConfigError, match="sm_86"):
        resolve_plan("fp8", gpu(141, (8, 6), "NVIDIA RTX A6000"), max_pixels=PX_1024)


def test_int8_from_ampere_on_and_only_by_name():
    assert "int8" in memory_plans.APPROXIMATE
    for capability in ((8, 0), (8, 6), (8, 9), (9, 0), (10, 0)):
        assert "int8" not in memory_plans.variants_for(capability)  # what auto may pick
        assert "int8" in memory_plans.variants_for(capability, approximate=True)
    assert "fp8" not in memory_plans.variants_for((8, 0), approximate=True)  # Ampere: int8, no fp8
    assert "int8" not in memory_plans.variants_for((7, 5), approximate=True)  # Turing: neither
    assert "int8" not in memory_plans.variants_for(None, approximate=True)
    with pytest.raises(ModelConfigError, match="int8 needs a CUDA GPU.*sm_75"):
        resolve_plan("int8", gpu(16, (7, 5), "Tesla T4"), max_pixels=PX_1024)


@pytest.mark.parametrize("gb, capability, pixels, expected", AUTO)
def test_auto_never_picks_int8(gb, capability, pixels, expected):
    for cap in (capability, (8, 6), (8, 9)):
        plan = memory_plans.choose(gb * GB, cap, pixels)
        assert plan is None or plan.variant not in memory_plans.APPROXIMATE


def test_explicit_int8_loads_resident_unchecked_until_its_plans_are_measured():
    assert "int8" not in memory_plans.MEASURED_VARIANTS
    for device in (gpu(80, AMPERE, "NVIDIA A100-SXM4-80GB"), gpu(24, (8, 6), "NVIDIA GeForce RTX 3090")):
        for pixels in (PX_1024, PX_2048):
            assert resolve_plan("int8", device, max_pixels=pixels) == memory_plans.MemoryPlan("int8", "resident")


def test_cpu_plans_do_not_consult_the_table():
    cpu = DeviceInfo(kind="cpu")
    assert resolve_plan("auto", cpu, max_pixels=4096 * 4096) == memory_plans.MemoryPlan("fp32", "resident")
    assert resolve_plan("bf16", cpu).variant == "bf16"
    with pytest.raises(ModelConfigError, match="CUDA GPU"):
        resolve_plan("nf4", cpu)
    for variant in ("int8", "fp8"):
        with pytest.raises(ModelConfigError, match=f"{variant} needs a .*this worker has no CUDA GPU"):
            resolve_plan(variant, cpu)


def test_measured_table_is_complete_and_consistent():
    assert set(memory_plans.SPEED_ORDER) - memory_plans.MEASURED_VARIANTS == {"int8"}  # not measured yet
    for variant in memory_plans.MEASURED_VARIANTS:
        for side in memory_plans.MEASURED_SIDES:
            resident = memory_plans.MEASURED[(variant, "resident", side)]
            offload = memory_plans.MEASURED[(variant, "offload", side)]
            assert 0 < offload.need_bytes < resident.need_bytes, (variant, side)
            for peak in (resident, offload):
                assert peak.allocated <= peak.runs_under <= peak.reserved + 0.01
        small, large = (memory_plans.MEASURED[(variant, "offload", s)] for s in memory_plans.MEASURED_SIDES)
        assert small.need_bytes < large.need_bytes, variant


# ---------------------------------------------------------------- the offloaded text encoder (tiny model, CPU)


@pytest.fixture(scope="module")
def tiny_loaded(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("plans") / "tiny", seed=0)
    return load_pipeline(ModelSettings(id=str(path)), device="cpu")


def test_offloaded_text_encoder_streams_its_blocks_and_gives_the_same_features(tiny_loaded):
    pipe = tiny_loaded.pipe
    encoder = pipe.text_encoder
    token_ids = _tokenize(pipe, "a poster that says OPEN", 2048)
    with torch.no_grad():
        resident = _text_features(pipe, token_ids)
    offload = TextEncoderOffload(encoder, "cpu")
    try:
        layers = encoder.language_model.layers
        assert len(offload.blocks) == len(layers) + len(encoder.visual.blocks) + len(
            encoder.visual.deepstack_merger_list)
        seen = []
        spy = layers[0].register_forward_pre_hook(lambda module, args: seen.append(module))  # after the onload
        with torch.no_grad():
            streamed = _text_features(pipe, token_ids)
        spy.remove()
        assert seen == [layers[0]]
        assert torch.equal(streamed, resident)
        masters = dict(offload._masters[len(encoder.visual.blocks) + len(encoder.visual.deepstack_merger_list)])
        assert all(p.data.data_ptr() == masters[p].data_ptr() for p in layers[0].parameters())  # back on the CPU copy
        assert offload.offloaded_bytes == sum(p.numel() * p.element_size() for b in offload.blocks
                                              for p in b.parameters())
    finally:
        offload.remove()
    assert len(layers[0]._forward_hooks) == 0
    with torch.no_grad():
        assert torch.equal(_text_features(pipe, token_ids), resident)


def test_bench_command_is_registered(capsys):
    from worker.bench.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["memory-plans", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: letterpress bench memory-plans ") and "--margins" in out
