"""A prompt's length in the model's own tokens, so the front door refuses what the worker would refuse.

The Ideogram 4 pipeline (diffusers `Ideogram4Pipeline.encode_prompt`, and the worker's `fast_path._tokenize`)
formats the prompt text (a prompt, or a caption's JSON) as one chat message, `apply_chat_template(messages,
add_generation_prompt=True, tokenize=False)`, tokenizes that with `add_special_tokens=False` and refuses more than
`max_sequence_length` tokens. That limit is an argument of the pipeline call (default 2048), not a value of the
model's config, so it is a setting: `settings.model.max_sequence_length`, which the worker passes to the pipeline.

The tokenizer is loaded once per process, lazily, from the configured model's `tokenizer/` folder (a local
directory, or a Hub id already in the local Hugging Face cache: never downloaded here), with the class the model's
`model_index.json` names: what diffusers itself loads. Not `AutoTokenizer`: it imports torch, which would cost the
API process about 2.4 s and 280 MB (measured) for nothing; the named class does not.

Cheap path first. With a byte-level BPE (GPT-2 style `ByteLevel` pre-tokenizer without an added prefix space,
BPE model: Qwen's and the tiny model's) the text is normalized (Qwen: NFC, which can *lengthen* a string, so the
bound is taken after it), split into bytes, one symbol each, and merges only join symbols; added and special tokens
stand for at least one byte of text each. So a text never has more tokens than the UTF-8 bytes of its normalized
form (normalized in parts: the template's text next to the prompt is markup and newlines, which compose with
nothing), and a prompt whose normalized bytes plus the chat template's own bytes fit the limit is accepted without
tokenizing (batch ingest checks up to a million lines). Longer ones are tokenized exactly as the pipeline does.
The bound is checked against the tiny model's tokenizer in tests/common/test_prompt_tokens.py; a tokenizer that is
not byte-level BPE is always tokenized.

No tokenizer (an API host without the model files, or `LETTERPRESS_MODEL__ID` empty, so each worker picks its model
by device): prompts are accepted (the character limit still holds) and one warning is logged, because no sound
refusal exists without the tokenizer: bytes only bound tokens from above. Such a prompt fails in the worker, as
before; README's configuration table and docs/SECURITY.md say so. The files are looked for again every `RETRY_S`.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.settings import ModelSettings, hub_cache_dir

log = logging.getLogger(__name__)

_SENTINEL = "\x00prompt\x00"  # marks where the template puts the prompt: no template holds it by itself


def chat_messages(prompt_text: str) -> list[dict]:
    """The one-message chat the pipeline makes of a prompt."""
    return [{"role": "user", "content": [{"type": "text", "text": prompt_text}]}]


@dataclass(frozen=True)
class PromptTokenizer:
    tokenizer: Any
    # UTF-8 bytes the chat template adds around the prompt and the tokenizer's normalizer; None: no byte bound
    template_bytes: int | None
    normalize: Callable[[str], str]

    def count(self, prompt_text: str) -> int:
        """Tokens of the chat-formatted prompt, exactly as the pipeline counts them (the Rust tokenizer's own
        `encode` is what `tokenizer(text)` runs, minus the Python wrapper's padding state: safe across threads)."""
        text = self.tokenizer.apply_chat_template(chat_messages(prompt_text), add_generation_prompt=True,
                                                  tokenize=False)
        return len(self.tokenizer.backend_tokenizer.encode(text, add_special_tokens=False))

    def upper_bound(self, prompt_text: str) -> int | None:
        """At least `count(prompt_text)`, without tokenizing; None when the tokenizer gives no such bound."""
        if self.template_bytes is None:
            return None
        return self.template_bytes + len(self.normalize(prompt_text).encode())

    @classmethod
    def wrap(cls, tokenizer: Any) -> PromptTokenizer:
        backend = tokenizer.backend_tokenizer  # a fast (Rust) tokenizer: a slow one has none (no check, a warning)
        normalizer = backend.normalizer
        normalize = normalizer.normalize_str if normalizer is not None else str
        rendered = tokenizer.apply_chat_template(chat_messages(_SENTINEL), add_generation_prompt=True,
                                                 tokenize=False)
        template_bytes = None
        if _byte_level_bpe(json.loads(backend.to_str())) and rendered.count(_SENTINEL) == 1:
            template_bytes = sum(len(normalize(part).encode()) for part in rendered.split(_SENTINEL))
        return cls(tokenizer=tokenizer, template_bytes=template_bytes, normalize=normalize)


def _byte_level_bpe(spec: dict) -> bool:
    """A BPE over a ByteLevel pre-tokenizer that adds no prefix space (which would add a byte of its own)."""
    def byte_levels(node: Any) -> list[dict]:
        if isinstance(node, dict):
            own = [node] if node.get("type") == "ByteLevel" else []
            return own + [b for value in node.values() for b in byte_levels(value)]
        return [b for value in node for b in byte_levels(value)] if isinstance(node, list) else []

    levels = byte_levels(spec.get("pre_tokenizer"))
    return spec["model"]["type"] == "BPE" and bool(levels) and not any(b.get("add_prefix_space") for b in levels)


# A tokenizer that cannot be loaded is looked for again this often: on a first deployment the API may start
# before a worker has downloaded the model into the cache they share.
RETRY_S = 60.0
_loaded: dict[tuple, tuple[PromptTokenizer | None, float]] = {}  # key -> (tokenizer, when to retry a None)
_lock = threading.Lock()


def prompt_tokenizer(model: ModelSettings) -> PromptTokenizer | None:
    """The configured model's tokenizer, loaded once per process (None, with one warning, while it cannot be)."""
    key = (model.id, model.revision, model.hf_home)  # cheap: looked up for every prompt
    if _due(_loaded.get(key)):
        with _lock:
            if _due(entry := _loaded.get(key)):
                _loaded[key] = (_load(model, warn=entry is None), time.monotonic() + RETRY_S)
    return _loaded[key][0]


def _due(entry: tuple | None) -> bool:
    """Never looked for, or not found and due for another look."""
    return entry is None or (entry[0] is None and time.monotonic() >= entry[1])


def _load(model: ModelSettings, *, warn: bool) -> PromptTokenizer | None:
    unchecked = "prompts are not checked against the token limit at the API; over-long ones fail in the worker"
    model_id = model.id
    if not model_id:
        if warn:
            log.warning("LETTERPRESS_MODEL__ID is empty (each worker picks its model by device): %s", unchecked)
        return None
    try:
        import transformers
        from huggingface_hub import snapshot_download

        root = Path(model_id).expanduser()
        if not root.is_dir():  # a Hub id: only what the local cache holds, never a download
            root = Path(snapshot_download(model_id, revision=model.revision, cache_dir=hub_cache_dir(model),
                                          local_files_only=True, allow_patterns=["model_index.json", "tokenizer/*"]))
        _, class_name = json.loads((root / "model_index.json").read_text())["tokenizer"]
        tokenizer = getattr(transformers, class_name).from_pretrained(str(root / "tokenizer"),
                                                                      local_files_only=True)
        loaded = PromptTokenizer.wrap(tokenizer)
    except Exception as exc:  # missing files, an unknown class, a slow tokenizer: the API keeps serving
        log.log(logging.WARNING if warn else logging.DEBUG, "cannot load the tokenizer of %s (%s: %s): %s; looking "
                "again every %.0f s", model_id, type(exc).__name__, exc, unchecked, RETRY_S)
        return None
    log.info("prompt token limit checked with the tokenizer of %s (%s)", model_id,
             "byte bound first" if loaded.template_bytes is not None else "every prompt tokenized")
    return loaded


def tokens_over_limit(prompt_text: str, model: ModelSettings) -> int | None:
    """The prompt's token count when it is over `model.max_sequence_length`, else None (also without a
    tokenizer: see the module docstring)."""
    tokenizer = prompt_tokenizer(model)
    if tokenizer is None:
        return None
    bound = tokenizer.upper_bound(prompt_text)
    if bound is not None and bound <= model.max_sequence_length:
        return None
    count = tokenizer.count(prompt_text)
    return count if count > model.max_sequence_length else None
