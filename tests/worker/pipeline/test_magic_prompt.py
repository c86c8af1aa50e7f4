"""worker.pipeline.magic_prompt on the tiny model (CPU): diffusers' enhancer grafted on the loaded text encoder
(no second copy), batched sampling with left padding, reproducible per call, validation against the caption
schema with one retry, the per-process cache; the tiny head is random, so its answers are not captions."""
from __future__ import annotations

import pytest

from common.captions import Caption
from common.settings import MagicPromptSettings
from tests.worker.pipeline.tiny_pipeline import load_tiny
from worker.pipeline import magic_prompt
from worker.pipeline.magic_prompt import EnhanceRequest, MagicPrompt, parse_caption

SHORT = MagicPromptSettings(max_new_tokens=16)
VALID = ('{"high_level_description":"A poster.","compositional_deconstruction":{"background":"Blue.",'
         '"elements":[{"type":"text","text":"HI","desc":"Big."}]}}')


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    return load_tiny(tmp_path_factory.mktemp("magic-model"))


def test_the_enhancer_shares_the_loaded_text_encoder(loaded):
    assert magic_prompt.available(loaded)
    enhancer = magic_prompt._enhancer(loaded)
    assert enhancer.model is loaded.pipe.text_encoder  # by reference: no second copy of the encoder
    assert enhancer.lm_head is loaded.pipe.prompt_enhancer_head.lm_head


def test_batched_sampling_is_reproducible_and_each_row_is_its_prompts(loaded):
    requests = [EnhanceRequest("a cat", 256, 256, 1), EnhanceRequest("a much longer prompt about a dog", 512, 256, 2)]
    once = magic_prompt.sample(loaded, requests, seed=7, temperature=1.0, max_new_tokens=8)
    again = magic_prompt.sample(loaded, requests, seed=7, temperature=1.0, max_new_tokens=8)
    assert once == again and len(once) == 2
    greedy_alone = magic_prompt.sample(loaded, requests[1:], seed=0, temperature=0.0, max_new_tokens=8)
    greedy_batched = magic_prompt.sample(loaded, requests, seed=0, temperature=0.0, max_new_tokens=8)
    assert greedy_batched[1] == greedy_alone[0]  # left padding does not change a prompt's answer


def test_invalid_answers_are_retried_once_then_none_and_cached(loaded):
    magic = MagicPrompt(loaded, SHORT)
    requests = [EnhanceRequest("a cat", 256, 256, 1), EnhanceRequest("a dog", 256, 256, 2)]
    assert magic.captions(requests) == [None, None]
    assert magic.generate_calls == 2  # one call for both, one retry for both
    assert magic.captions(requests[:1]) == [None] and magic.generate_calls == 2  # answered from the cache


def test_a_valid_answer_is_a_caption_and_anything_else_is_not():
    caption = parse_caption(VALID)
    assert isinstance(caption, Caption) and caption.compositional_deconstruction.elements[0].text == "HI"
    broken = VALID.replace('"type":"text"', '"type":"txt"')
    for text in ("", "not json", '{"high_level_description": "only"}', VALID[:-1], broken):
        assert parse_caption(text) is None
