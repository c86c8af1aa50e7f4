"""common.prompt_tokens: a prompt's length in the model's own tokens (counted as the pipeline counts them), the
byte bound that lets most prompts through without tokenizing, and what happens without a tokenizer; and the
refusals it gives `to_params` and batch lines, naming `prompt` or `caption`."""
from __future__ import annotations

import json
import logging
import random
import shutil
import unicodedata
from types import SimpleNamespace

import pytest

from common import prompt_tokens
from common.batches import LineError, parse_item
from common.job_request import JobRequest, RequestError, to_params
from common.prompt_tokens import PromptTokenizer, prompt_tokenizer, tokens_over_limit
from common.settings import ApiSettings, ModelSettings, Settings, use_settings

API = ApiSettings()
# Texts of every kind the byte bound must hold for: scripts of 1 to 4 UTF-8 bytes a character, emoji, combining
# marks, characters NFC decomposes (longer after normalization), the template's own special-token strings, spaces
PIECES = ["a photo of a cat ", "VISIT THE ALPS", "caf\u00e9 \u00fc\u00df", "\u65e5\u672c\u8a9e\u306e\u30c6\u30ad",
          "\U0001f600\U0001f389", "e\u0301\u0323", "\u0958\ufb2c\u2126", "<|im_start|>", "<|im_end|>", "<|endoftext|>",
          " \n\t  ", '{"k": [1, 2.5]}', "0123456789"]


@pytest.fixture(scope="module")
def tiny(tiny_model) -> ModelSettings:
    return ModelSettings(id=str(tiny_model))


@pytest.fixture(scope="module")
def tokenizer(tiny) -> PromptTokenizer:
    loaded = prompt_tokenizer(tiny)
    assert loaded is not None
    return loaded


def texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(PIECES) for _ in range(rng.randint(0, 300))) for _ in range(n)]


def test_counts_as_the_pipeline_does(tiny_model, tokenizer):
    """The issue's own figure: 8,000 characters were 8,016 tokens in the worker. And the same count as the
    model's tokenizer loaded by AutoTokenizer, formatted and tokenized as `Ideogram4Pipeline.encode_prompt` does."""
    from transformers import AutoTokenizer

    assert tokenizer.count("x" * 8000) == 8016
    reference = AutoTokenizer.from_pretrained(str(tiny_model / "tokenizer"), local_files_only=True)
    for text in texts(20) + [""]:
        messages = [{"role": "user", "content": [{"type": "text", "text": text}]}]
        chat = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        assert tokenizer.count(text) == len(reference(chat, add_special_tokens=False)["input_ids"])


def test_the_tiny_tokenizer_never_has_more_tokens_than_bytes(tokenizer):
    """The claim the cheap path rests on, for the tokenizer the tests and CPU machines use (byte-level BPE, no
    normalizer): tokens <= UTF-8 bytes of the prompt + the chat template's bytes."""
    assert tokenizer.template_bytes == len(tokenizer.tokenizer.apply_chat_template(
        prompt_tokens.chat_messages(""), add_generation_prompt=True, tokenize=False).encode())
    for text in texts(200, seed=1):
        assert tokenizer.count(text) <= tokenizer.upper_bound(text), text


def test_a_normalizing_tokenizer_is_bounded_after_normalization(tmp_path, tokenizer):
    """Qwen's tokenizer (the real model's class, here with the tiny vocabulary) normalizes to NFC first, which can
    double a text's bytes: 600 x U+FB2C are 1,800 bytes and 3,616 tokens. A bound on the raw bytes would let them
    through under a 2,048 limit; the bound on the normalized bytes does not."""
    from transformers import Qwen2Tokenizer

    spec = json.loads(tokenizer.tokenizer.backend_tokenizer.to_str())
    qwen = Qwen2Tokenizer(vocab=spec["model"]["vocab"], merges=[tuple(m) for m in spec["model"]["merges"]],
                          additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    qwen.chat_template = tokenizer.tokenizer.chat_template
    qwen.save_pretrained(tmp_path / "tokenizer")
    (tmp_path / "model_index.json").write_text(json.dumps({"tokenizer": ["transformers", "Qwen2Tokenizer"]}))
    model = ModelSettings(id=str(tmp_path))
    loaded = prompt_tokenizer(model)
    assert type(loaded.tokenizer).__name__ == "Qwen2Tokenizer"  # the class model_index.json names

    text = "\ufb2c" * 600
    assert len(text.encode()) + loaded.template_bytes <= model.max_sequence_length
    assert unicodedata.normalize("NFC", text) != text
    assert loaded.upper_bound(text) >= loaded.count(text) > model.max_sequence_length
    assert tokens_over_limit(text, model) == loaded.count(text)
    for text in texts(50, seed=2):
        assert loaded.count(text) <= loaded.upper_bound(text), text


def test_short_prompts_pass_without_tokenizing(tiny, tokenizer, monkeypatch):
    monkeypatch.setattr(PromptTokenizer, "count", lambda *_: pytest.fail("tokenized a prompt under the bound"))
    assert tokens_over_limit("a" * (tiny.max_sequence_length - tokenizer.template_bytes), tiny) is None


def test_long_prompts_are_tokenized_and_refused_only_over_the_limit(tiny, tokenizer):
    words = "the quick brown fox jumps over the lazy dog " * 60  # 2,640 bytes, far fewer tokens
    assert tokenizer.upper_bound(words) > tiny.max_sequence_length >= tokenizer.count(words)
    assert tokens_over_limit(words, tiny) is None
    assert tokens_over_limit("x" * 8000, tiny) == 8016
    # the limit is the setting's (the pipeline call's max_sequence_length), not a constant
    small = tiny.model_copy(update={"max_sequence_length": 100})
    assert tokens_over_limit("x" * 84, small) is None  # 84 + 16 template tokens
    assert tokens_over_limit("x" * 85, small) == 101


def test_a_hub_id_is_read_from_the_local_cache(tiny_model, tmp_path):
    """A Hub id loads from the Hugging Face cache under `model.hf_home` (as the worker's loader finds it)."""
    snapshot = tmp_path / "hub" / "models--letterpress-test--cached" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    shutil.copy(tiny_model / "model_index.json", snapshot)
    shutil.copytree(tiny_model / "tokenizer", snapshot / "tokenizer")
    model = ModelSettings(id="letterpress-test/cached", hf_home=str(tmp_path))
    assert tokens_over_limit("x" * 8000, model) == 8016


@pytest.mark.parametrize("model_id", ["", "/nonexistent/letterpress-model", "letterpress-test/not-in-cache"])
def test_without_a_tokenizer_prompts_are_accepted_with_one_warning(model_id, tmp_path, caplog):
    model = ModelSettings(id=model_id, hf_home=str(tmp_path))  # an empty cache: a Hub id is never downloaded
    with caplog.at_level(logging.WARNING, logger="common.prompt_tokens"):
        assert tokens_over_limit("x" * 8000, model) is None
        assert tokens_over_limit("y" * 8000, model) is None
    (warning,) = [r for r in caplog.records if r.name == "common.prompt_tokens"]
    assert "not checked against the token limit" in warning.getMessage()


def test_a_tokenizer_that_appears_later_is_found(tiny_model, tmp_path, monkeypatch):
    """The API may start before a worker has put the model in the cache they share: it looks again."""
    clock = SimpleNamespace(now=0.0)
    monkeypatch.setattr(prompt_tokens, "time", SimpleNamespace(monotonic=lambda: clock.now))
    model = ModelSettings(id=str(tmp_path / "model"))
    assert tokens_over_limit("x" * 8000, model) is None
    shutil.copytree(tiny_model, tmp_path / "model", ignore=shutil.ignore_patterns("*.safetensors"))
    clock.now = prompt_tokens.RETRY_S - 1
    assert tokens_over_limit("x" * 8000, model) is None  # not looked for again yet
    clock.now = prompt_tokens.RETRY_S
    assert tokens_over_limit("x" * 8000, model) == 8016


# ------------------------------------------------------------------------- to_params and batch lines

def test_to_params_names_prompt_or_caption(tiny):
    with pytest.raises(RequestError) as caught:
        to_params(JobRequest(prompt="x" * 8000), API, tiny)
    assert caught.value.field == "prompt" and "8,016 tokens" in str(caught.value) and "2,048" in str(caught.value)
    caption = {"high_level_description": "x" * 2000,  # each caption text may be 2,000 characters
               "compositional_deconstruction": {"background": "y" * 2000, "elements": []}}
    with pytest.raises(RequestError) as caught:
        to_params(JobRequest(caption=caption), API, tiny)
    assert caught.value.field == "caption"
    assert to_params(JobRequest(prompt="a red fox"), API, tiny)["prompt_text"] == "a red fox"


def test_a_batch_line_over_the_limit_is_a_line_error_naming_prompt(tiny):
    with use_settings(Settings(model=tiny)):
        (error,) = parse_item(3, {"custom_id": "long", "prompt": "x" * 8000}, API)
        assert parse_item(4, {"custom_id": "short", "prompt": "a cat"}, API).custom_id == "short"
    assert isinstance(error, LineError)
    assert (error.line, error.field, error.custom_id) == (3, "prompt", "long")
