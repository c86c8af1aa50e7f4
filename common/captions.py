"""The Ideogram 4 structured caption schema. The model is trained on these JSON captions; a caption is
serialized to compact JSON and fed to the text encoder exactly like a text prompt."""
from __future__ import annotations

import json
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from common.input_limits import PlainText

Text = Annotated[PlainText, Field(min_length=1, max_length=2000)]


class ObjectElement(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["obj"]
    desc: Text


class TextElement(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: Annotated[PlainText, Field(min_length=1, max_length=500)]
    desc: Text | None = None


Element = Annotated[Union[ObjectElement, TextElement], Field(discriminator="type")]


class CompositionalDeconstruction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    background: Text
    elements: list[Element] = Field(default_factory=list, max_length=64)


class Caption(BaseModel):
    model_config = ConfigDict(extra="forbid")
    high_level_description: Text
    compositional_deconstruction: CompositionalDeconstruction

    def to_prompt_text(self) -> str:
        """The exact string the text encoder sees (stable key order, no whitespace, so it caches and
        reproduces byte for byte)."""
        return json.dumps(self.model_dump(exclude_none=True), separators=(",", ":"), ensure_ascii=False)


def enhancer_messages(prompt: str, width: int, height: int) -> list[dict]:
    """The chat the prompt enhancer answers with a caption (magic prompt): diffusers' own instructions and user
    turn, with the image's aspect ratio (worker/pipeline/magic_prompt.py; the tiny model's head is trained on it)."""
    import math

    from diffusers.pipelines.ideogram4.prompt_enhancer import CAPTION_SYSTEM_MESSAGE, CAPTION_USER_TEMPLATE

    divisor = math.gcd(width, height) or 1
    return [{"role": "system", "content": CAPTION_SYSTEM_MESSAGE},
            {"role": "user", "content": CAPTION_USER_TEMPLATE.format(aspect_ratio=f"{width // divisor}:"
                                                                                  f"{height // divisor}",
                                                                     original_prompt=prompt)}]


def enhancer_chat_ids(tokenizer, prompt: str, width: int, height: int) -> list[int]:
    """The token ids of that chat, ready for the enhancer's answer (`tokenizer`: the model's own)."""
    ids = tokenizer.apply_chat_template(enhancer_messages(prompt, width, height), add_generation_prompt=True,
                                        tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
