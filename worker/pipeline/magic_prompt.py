"""Magic prompt: a text prompt rewritten into an Ideogram 4 structured caption by the pipeline's own prompt enhancer.

The enhancer is diffusers' `Ideogram4PromptEnhancerHead` (the optional `prompt_enhancer_head` component: one
hidden x vocab linear layer) grafted onto the Qwen3-VL text encoder already loaded for conditioning
(`build_prompt_enhancer`: the body is shared by reference, no second copy of the encoder). It is given diffusers'
own instructions (`CAPTION_SYSTEM_MESSAGE`, `CAPTION_USER_TEMPLATE` with the image's aspect ratio) and samples at
diffusers' temperature.

What this module adds to `Ideogram4Pipeline.upsample_prompt` (which runs one prompt per `generate` call and returns
whatever text came out):
- **Batched**: the prompts of one worker call (its co-batched jobs) are left-padded into one `generate` call.
- **Validated**: the text must parse as a `common.captions.Caption` (the schema the API takes); an invalid output is
  sampled once more (the next seed), then reported as None: the caller fails the job (`ON`) or keeps the text
  prompt (`AUTO`).
- **Cached** per worker process by (tenant, prompt, size, temperature, seed, model and revision): the same request
  does not sample the enhancer twice, and one tenant never gets another's answer (its speed would tell).
  Sampling is seeded from the requests of the call, so a call is reproducible; a job does not depend on it
  afterwards, since its caption is stored on the job (worker/attempt.py) before generating.
- **Or remote**: with `LETTERPRESS_MAGIC_PROMPT__ENDPOINT` set, the same chat goes to an OpenAI-compatible server
  (vLLM or SGLang hosting the same Qwen3-VL model with the head, for fleets that keep a separate LLM pool), one
  request per prompt, sent together; the validation, retry and cache are the same.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from pydantic import ValidationError

from common.captions import Caption, enhancer_chat_ids, enhancer_messages
from common.settings import MagicPromptSettings

if TYPE_CHECKING:
    from worker.pipeline.loading import LoadedPipeline

log = logging.getLogger(__name__)


class MagicPromptUnavailable(RuntimeError):
    """The loaded model has no `prompt_enhancer_head`."""


@dataclass(frozen=True)
class EnhanceRequest:
    prompt: str
    width: int
    height: int
    seed: int
    tenant: str = ""  # never sent to the model: keeps one tenant's cached answers from another (a timing tell)


def available(loaded: LoadedPipeline) -> bool:
    return getattr(loaded.pipe, "prompt_enhancer_head", None) is not None


def _enhancer(loaded: LoadedPipeline):
    """The generative model: the loaded text encoder's body with the head grafted on (built once, as diffusers'
    `upsample_prompt` does, in the same attribute)."""
    pipe = loaded.pipe
    if not available(loaded):
        raise MagicPromptUnavailable("magic prompt needs the model's prompt_enhancer_head, which is not loaded")
    if getattr(pipe, "_prompt_enhancer", None) is None:
        from diffusers.pipelines.ideogram4.prompt_enhancer import build_prompt_enhancer

        pipe._prompt_enhancer = build_prompt_enhancer(pipe.text_encoder, pipe.prompt_enhancer_head)
    return pipe._prompt_enhancer


@torch.no_grad()
def sample(loaded: LoadedPipeline, requests: list[EnhanceRequest], *, seed: int, temperature: float,
           max_new_tokens: int) -> list[str]:
    """One `generate` call over all requests (left-padded); the decoded new text of each."""
    enhancer = _enhancer(loaded)
    tokenizer = loaded.pipe.tokenizer
    rows = [enhancer_chat_ids(tokenizer, r.prompt, r.width, r.height) for r in requests]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = loaded.pipe._execution_device
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=device)
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
    fork = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=fork):
        torch.manual_seed(seed)
        out = enhancer.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                                top_k=None, top_p=None, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                                use_cache=True)
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in out[:, width:]]


def parse_caption(text: str) -> Caption | None:
    """The enhancer's output as a caption, or None when it is not one (the API's own schema decides)."""
    try:
        return Caption.model_validate_json(text)
    except (ValidationError, ValueError):
        return None


def _call_seed(requests: list[EnhanceRequest], attempt: int) -> int:
    digest = hashlib.sha256(repr([(r.prompt, r.width, r.height, r.seed) for r in requests]).encode()).digest()
    return (int.from_bytes(digest[:8], "big") + attempt) % (2**63 - 1)


class EndpointSampler:
    """The enhancer's chat sent to an OpenAI-compatible `/chat/completions` endpoint, one request per prompt, all at
    once (the server batches them). A failed request is an empty answer: invalid, so retried, then reported."""

    def __init__(self, settings: MagicPromptSettings):
        self.settings = settings

    def __call__(self, requests: list[EnhanceRequest], *, seed: int) -> list[str]:
        import httpx

        s = self.settings
        headers = {"authorization": f"Bearer {s.api_key.get_secret_value()}"} if s.api_key.get_secret_value() else {}
        url = s.endpoint.rstrip("/") + "/chat/completions"

        def ask(i_request: tuple[int, EnhanceRequest]) -> str:
            i, r = i_request
            body = {"model": s.model, "messages": enhancer_messages(r.prompt, r.width, r.height),
                    "temperature": s.temperature, "max_tokens": s.max_new_tokens, "seed": (seed + i) % 2**31}
            try:
                with httpx.Client(timeout=s.timeout_s) as client:
                    answer = client.post(url, json=body, headers=headers)
                answer.raise_for_status()
                return str(answer.json()["choices"][0]["message"]["content"]).strip()
            except (httpx.HTTPError, KeyError, IndexError, TypeError, ValueError) as exc:
                log.warning("magic prompt endpoint %s: %s", url, exc)
                return ""

        with ThreadPoolExecutor(max_workers=min(16, len(requests))) as pool:
            return list(pool.map(ask, enumerate(requests)))


class MagicPrompt:
    """Captions for prompts, batched, validated (one retry) and cached: on the loaded pipeline's own enhancer, or
    on the configured endpoint."""

    def __init__(self, loaded: LoadedPipeline, settings: MagicPromptSettings | None = None):
        settings = settings or MagicPromptSettings()
        self.loaded = loaded
        self.temperature = settings.temperature
        self.max_new_tokens = settings.max_new_tokens
        self.remote = EndpointSampler(settings) if settings.endpoint else None
        cache_entries = settings.cache_entries
        self._cache: OrderedDict[tuple, Caption | None] = OrderedDict()
        self._cache_entries = cache_entries
        self._lock = threading.Lock()
        self.generate_calls = 0  # how many enhancer calls ran (tests, metrics)

    @property
    def available(self) -> bool:
        return self.remote is not None or available(self.loaded)

    def _key(self, r: EnhanceRequest) -> tuple:
        return (r.tenant, r.prompt, r.width, r.height, self.temperature, r.seed, self.loaded.model_id,
                self.loaded.revision)

    def captions(self, requests: list[EnhanceRequest]) -> list[Caption | None]:
        """A caption for each request, or None where the enhancer gave no valid caption in two samples."""
        with self._lock:
            found = {self._key(r): self._cache[self._key(r)] for r in requests if self._key(r) in self._cache}
        missing = list(dict.fromkeys(r for r in requests if self._key(r) not in found))
        for attempt in range(2):
            if not missing:
                break
            self.generate_calls += 1
            seed = _call_seed(missing, attempt)
            texts = (self.remote(missing, seed=seed) if self.remote is not None else
                     sample(self.loaded, missing, seed=seed, temperature=self.temperature,
                            max_new_tokens=self.max_new_tokens))
            parsed = {self._key(r): parse_caption(t) for r, t in zip(missing, texts)}
            found.update(parsed)
            missing = [r for r in missing if parsed[self._key(r)] is None]
        with self._lock:
            for key, caption in found.items():
                self._cache[key] = caption
                self._cache.move_to_end(key)
            while len(self._cache) > self._cache_entries:
                self._cache.popitem(last=False)
        return [found[self._key(r)] for r in requests]
