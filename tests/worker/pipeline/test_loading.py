"""The tiny model and the one pipeline loader: real `from_pretrained` on a locally built checkpoint, variant
selection (pure, so GPU rules are checked on CPU) and the error messages users act on."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import httpx
import pytest
import torch
from huggingface_hub.errors import (
    GatedRepoError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)

from common.devstack.tiny_model import (
    TINY_MARKER,
    build_tiny_model,
    ensure_default_tiny_model,
    is_tiny_model,
)
from common.settings import ModelSettings, Settings
from worker.pipeline import loading as pipeline_loader
from worker.pipeline.loading import (
    DEFAULT_HUB_MODEL,
    DeviceInfo,
    ModelConfigError,
    default_model_id,
    load_pipeline,
    resolve_variant,
    translate_load_error,
)

CPU = DeviceInfo(kind="cpu")
A100_80 = DeviceInfo(kind="cuda", total_memory=80 * 10**9, capability=(8, 0), name="NVIDIA A100-SXM4-80GB")
L4_24 = DeviceInfo(kind="cuda", total_memory=24 * 10**9, capability=(8, 9), name="NVIDIA L4")
RTX3090_24 = DeviceInfo(kind="cuda", total_memory=24 * 10**9, capability=(8, 6), name="NVIDIA GeForce RTX 3090")
H100_80 = DeviceInfo(kind="cuda", total_memory=80 * 10**9, capability=(9, 0), name="NVIDIA H100 80GB HBM3")
L40S_48 = DeviceInfo(kind="cuda", total_memory=48 * 10**9, capability=(8, 9), name="NVIDIA L40S")
T4_16 = DeviceInfo(kind="cuda", total_memory=16 * 10**9, capability=(7, 5), name="Tesla T4")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("loader") / "tiny", seed=0)


# ---------------------------------------------------------------- the tiny model


def _weights(path: Path) -> dict[str, bytes]:
    return {str(f.relative_to(path)): f.read_bytes() for f in sorted(path.rglob("*.safetensors"))}


def test_tiny_model_is_deterministic_per_seed(tiny_dir, tmp_path):
    again = build_tiny_model(tmp_path / "again", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    assert _weights(again) == _weights(tiny_dir)
    assert _weights(other).keys() == _weights(tiny_dir).keys() and _weights(other) != _weights(tiny_dir)
    assert json.loads((tiny_dir / TINY_MARKER).read_text()) == {"tiny": True, "seed": 0, "version": 2}
    assert is_tiny_model(tiny_dir) and not is_tiny_model(tmp_path)


def test_tiny_model_build_refuses_to_overwrite_other_files(tmp_path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("not a model")
    with pytest.raises(FileExistsError):
        build_tiny_model(foreign)
    assert (foreign / "keep.txt").is_file()


def test_tiny_model_loads_through_load_pipeline(tiny_dir):
    loaded = load_pipeline(ModelSettings(id=str(tiny_dir), max_sequence_length=1024), device="cpu")
    pipe = loaded.pipe
    assert (loaded.device, loaded.dtype, loaded.variant) == ("cpu", torch.float32, "fp32")
    assert loaded.max_sequence_length == 1024  # the setting reaches both generation paths
    assert (loaded.model_id, loaded.revision) == (str(tiny_dir), None)
    assert type(pipe).__name__ == "Ideogram4Pipeline"
    assert type(pipe.text_encoder).__name__ == "Qwen3VLModel"
    assert len(pipe.text_encoder.language_model.layers) == 36  # the pipeline taps layers up to 35
    assert pipe.transformer.dtype == torch.float32 and pipe.vae_scale_factor * pipe.patch_size == 16
    assert pipe._progress_bar_config.get("disable") is True


def test_tiny_tokenizer_tokenizes_any_text(tiny_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "tokenizer")
    caption = '{"high_level_description": "Café «Ünïcode» 😀", "elements": [{"type": "text", "text": "SALE 50%"}]}'
    messages = [{"role": "user", "content": [{"type": "text", "text": caption}]}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_start|>assistant\n")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.unk_token_id is None or tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text  # byte-level: nothing is lost
    assert len(set(ids)) > 20


# ---------------------------------------------------------------- variant selection


@pytest.mark.parametrize(
    "requested, device, expected",
    [
        ("auto", CPU, "fp32"),
        ("auto", H100_80, "bf16"),  # the fastest exact plan that fits (tests/worker/pipeline/test_memory_plans.py)
        ("auto", L40S_48, "nf4"),  # 48 GB at 2048², the API's default largest image (fp8 only when asked for)
        ("auto", A100_80, "bf16"),
        ("fp32", CPU, "fp32"),
        ("bf16", CPU, "bf16"),  # allowed, slow
        ("fp32", H100_80, "fp32"),
        ("NF4", A100_80, "nf4"),
        ("nf4-dequant", A100_80, "nf4-dequant"),
        ("fp8", H100_80, "fp8"),
        ("fp8", L40S_48, "fp8"),  # Ada
        ("int8", A100_80, "int8"),  # Ampere: what int8 is for
        ("INT8", RTX3090_24, "int8"),  # no measured memory plan: loaded resident, unchecked (test_memory_plans.py)
        ("int8", H100_80, "int8"),  # Hopper runs it too (the H200 measured it)
        ("", CPU, "fp32"),
    ],
)
def test_resolve_variant(requested, device, expected):
    assert resolve_variant(requested, device) == expected


@pytest.mark.parametrize(
    "requested, device, fragments",
    [
        ("fp8", A100_80, ["8.9", "H100", "sm_80", "A100"]),
        ("fp8", RTX3090_24, ["8.9", "L40S", "sm_86"]),
        ("fp8", CPU, ["no CUDA GPU"]),
        ("int8", CPU, ["int8 needs a CUDA GPU", "8.0", "A100", "no CUDA GPU", "fp32"]),
        ("int8", T4_16, ["int8 needs a CUDA GPU", "8.0", "Tesla T4 is sm_75"]),
        ("nf4", CPU, ["bitsandbytes", "CUDA GPU"]),
        ("nf4-dequant", CPU, ["bitsandbytes", "CUDA GPU"]),
        ("int3", H100_80, ["unknown model variant", "nf4-dequant"]),
        ("auto", L4_24, ["no measured memory plan fits", "NVIDIA L4"]),  # at 2048², the default largest image
        ("NF4", L4_24, ["variant nf4 does not fit"]),
    ],
)
def test_resolve_variant_refuses_impossible_choices(requested, device, fragments):
    with pytest.raises(ModelConfigError) as refused:
        resolve_variant(requested, device)
    for fragment in fragments:
        assert fragment in str(refused.value)


def test_load_refuses_nf4_on_cpu_before_loading(tiny_dir):
    with pytest.raises(ModelConfigError, match="CUDA"):
        load_pipeline(ModelSettings(id=str(tiny_dir), variant="nf4"), device="cpu")


def test_load_refuses_int8_on_cpu_before_loading(tiny_dir):
    with pytest.raises(ModelConfigError, match="int8 needs a CUDA GPU.*no CUDA GPU"):
        load_pipeline(ModelSettings(id=str(tiny_dir), variant="int8"), device="cpu")


# ---------------------------------------------------------------- fp8 and int8: which linears torchao quantizes


@pytest.fixture(scope="module")
def tiny_transformer(tiny_dir):
    from diffusers import Ideogram4Transformer2DModel

    return Ideogram4Transformer2DModel.from_pretrained(tiny_dir / "transformer")


def _linears(model: torch.nn.Module, keep) -> set[str]:
    return {fqn for fqn, module in model.named_modules() if isinstance(module, torch.nn.Linear) and keep(module, fqn)}


def test_int8_quantizes_the_block_linears_fed_by_every_token_not_the_adaln_ones(tiny_transformer):
    from worker.pipeline.loading import block_linear, int8_block_linear

    every = _linears(tiny_transformer, lambda module, fqn: True)
    fp8, int8 = _linears(tiny_transformer, block_linear), _linears(tiny_transformer, int8_block_linear)
    layers = len(tiny_transformer.layers)
    per_block = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "feed_forward.w1",
                 "feed_forward.w2", "feed_forward.w3")
    assert int8 == {f"layers.{i}.{name}" for i in range(layers) for name in per_block}
    # adaln_modulation sees one row a sample (torch._int_mm refuses M = 1): bf16 under int8, fp8 under fp8
    assert fp8 - int8 == {f"layers.{i}.adaln_modulation" for i in range(layers)}
    # neither touches the embedders, the text projection or the final layer (its adaLN included)
    assert {"input_proj", "llm_cond_proj", "adaln_proj", "final_layer.linear",
            "final_layer.adaln_modulation"} <= every - fp8


def test_int8_and_fp8_without_torchao_say_what_to_install(tiny_transformer, monkeypatch):
    from worker.pipeline.loading import _QUANTIZERS

    monkeypatch.setitem(sys.modules, "torchao", None)  # `import torchao...` raises ImportError
    monkeypatch.setitem(sys.modules, "torchao.quantization", None)
    for variant in ("int8", "fp8"):
        with pytest.raises(ModelConfigError, match=f"{variant} needs torchao: pip install 'letterpress\\[gpu\\]'"):
            _QUANTIZERS[variant](tiny_transformer)
    assert all(type(p) is torch.nn.Parameter for p in tiny_transformer.parameters())  # nothing was converted


def test_int8_quantization_of_the_tiny_transformer_keeps_adaln_bf16(tiny_dir):
    """torchao on the CPU (where it is installed): the shared helper converts exactly the filtered linears."""
    pytest.importorskip("torchao.quantization")
    from diffusers import Ideogram4Transformer2DModel

    from worker.pipeline.loading import _quantize_int8_model, int8_block_linear

    transformer = Ideogram4Transformer2DModel.from_pretrained(tiny_dir / "transformer", torch_dtype=torch.bfloat16)
    _quantize_int8_model(transformer)
    converted = {fqn for fqn, module in transformer.named_modules()
                 if isinstance(module, torch.nn.Linear) and type(module.weight) is not torch.nn.Parameter}
    assert converted == _linears(transformer, int8_block_linear)


# ---------------------------------------------------------------- default model


def test_default_model_without_gpu_is_the_tiny_model_which_the_worker_never_builds(tmp_path):
    settings = Settings(home=tmp_path / "home", model=ModelSettings())  # not the test stack's model from the env
    with pytest.raises(ModelConfigError, match="letterpress model init-tiny"):
        default_model_id(settings, CPU)
    assert not (tmp_path / "home" / "models").exists()
    built = ensure_default_tiny_model(settings, cpu_only=True)  # what `letterpress worker` / `up` run first
    assert built == settings.tiny_model_dir == (tmp_path / "home" / "models" / "tiny").resolve()
    assert Path(default_model_id(settings, CPU)) == built
    assert is_tiny_model(built)
    # a tiny model built by an older version (no prompt enhancer head) is rebuilt; the current one is kept
    marker = built / "letterpress_tiny.json"
    marker.write_text(json.dumps({"tiny": True, "seed": 0}))
    index = json.loads((built / "model_index.json").read_text())
    (built / "model_index.json").write_text(json.dumps({k: v for k, v in index.items()
                                                        if k != "prompt_enhancer_head"}))
    ensure_default_tiny_model(settings, cpu_only=True)
    assert "prompt_enhancer_head" in json.loads((built / "model_index.json").read_text())
    stamp = marker.stat().st_mtime_ns
    ensure_default_tiny_model(settings, cpu_only=True)
    assert marker.stat().st_mtime_ns == stamp
    explicit = Settings(home=tmp_path / "other", model=ModelSettings(id="me/my-finetune"))
    assert ensure_default_tiny_model(explicit, cpu_only=True) is None


def test_default_model_with_gpu_is_the_hub_nf4_model_and_explicit_id_wins(tmp_path):
    assert default_model_id(Settings(home=tmp_path, model=ModelSettings()), H100_80) == DEFAULT_HUB_MODEL
    assert not (tmp_path / "models").exists()
    explicit = Settings(home=tmp_path, model=ModelSettings(id="me/my-finetune"))
    assert default_model_id(explicit, CPU) == "me/my-finetune"


# ---------------------------------------------------------------- errors and Hub options


def test_missing_local_directory_says_how_to_build_one(tmp_path):
    with pytest.raises(ModelConfigError) as missing:
        load_pipeline(ModelSettings(id=str(tmp_path / "nope")), device="cpu")
    message = str(missing.value)
    assert "not found" in message and "letterpress model init-tiny PATH" in message and "Hub id" in message


def _http_error(cls, status: int, message: str = "denied"):
    response = httpx.Response(status, request=httpx.Request("GET", "https://huggingface.co/api/models/x"))
    return cls(message, response=response)


def _wrapped(inner: BaseException) -> OSError:
    """What diffusers raises: a generic error `from` the Hub error."""
    try:
        try:
            raise inner
        except BaseException as exc:
            raise OSError("Cannot load model: not fully cached locally") from exc
    except OSError as outer:
        return outer


@pytest.mark.parametrize("inner", [
    _http_error(GatedRepoError, 403, "Access to model is restricted"),
    _http_error(RepositoryNotFoundError, 401, "401 Client Error"),
])
def test_gated_or_unauthorized_says_accept_the_licence_and_set_hf_token(inner):
    error = translate_load_error(_wrapped(inner), model_id=DEFAULT_HUB_MODEL, variant="nf4")
    assert f"accept the licence at https://huggingface.co/{DEFAULT_HUB_MODEL}" in str(error)
    assert "HF_TOKEN" in str(error)


def test_unknown_hub_repo_is_not_found():
    error = translate_load_error(_wrapped(_http_error(RepositoryNotFoundError, 404)), model_id="me/typo",
                                 variant="bf16")
    assert "not found" in str(error) and "init-tiny" in str(error)


def test_offline_and_not_cached_says_unset_offline_or_pre_download():
    error = translate_load_error(_wrapped(LocalEntryNotFoundError("not in cache")), model_id=DEFAULT_HUB_MODEL,
                                 variant="nf4", offline=True)
    assert "offline" in str(error) and "pre-download" in str(error)


def test_cuda_oom_says_which_variant_fits():
    error = translate_load_error(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
                                 model_id=DEFAULT_HUB_MODEL, variant="bf16", device_info=L4_24)
    message = str(error)
    assert "NVIDIA L4 (24 GB)" in message and "56 GB" in message and "VARIANT=nf4" in message


def test_hub_options_reach_from_pretrained(monkeypatch, tmp_path):
    import diffusers

    seen = {}

    def fake_from_pretrained(model_id, **kwargs):
        seen.update(kwargs, model_id=model_id)
        raise RuntimeError("stop here")

    monkeypatch.setattr(diffusers.Ideogram4Pipeline, "from_pretrained", fake_from_pretrained)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    model = ModelSettings(id="org/model", revision="abc123", hf_token="hf_secret", hf_home=str(tmp_path / "hf"),
                          offline=True)
    with pytest.raises(ModelConfigError, match="could not load 'org/model' as fp32"):
        load_pipeline(model, device="cpu")
    assert seen == {"model_id": "org/model", "dtype": torch.float32, "revision": "abc123", "token": "hf_secret",
                        "cache_dir": str(tmp_path / "hf" / "hub"), "local_files_only": True}


def test_local_directories_get_no_hub_options(monkeypatch, tiny_dir):
    seen = {}
    real = pipeline_loader._load

    def spy(source, variant, device_info):
        seen["kwargs"] = source.hub_kwargs()
        return real(source, variant, device_info)

    monkeypatch.setattr(pipeline_loader, "_load", spy)
    load_pipeline(ModelSettings(id=str(tiny_dir), offline=True, hf_home="/nonexistent"), device="cpu")
    assert seen["kwargs"] == {}
