"""`letterpress bench magic-prompt`: what the prompt enhancer (magic prompt) costs on this GPU.

The real sizes with random weights (no checkpoint can be downloaded here): the Qwen3-VL-8B-sized text encoder of
`worker.bench.models.build_random_real` (36 layers of width 4,096, bf16) with diffusers'
`Ideogram4PromptEnhancerHead` (4,096 x 151,936) grafted on by `build_prompt_enhancer`, exactly as
worker/pipeline/magic_prompt.py does. Random weights do not write captions, so every call is made to produce
exactly `--new-tokens` tokens (no early end), from a chat of `--prompt-tokens` tokens (diffusers' instructions are
about 1,700 tokens with the Qwen tokenizer; random ids of that length stand in). Reported per batch size, side by
side in one process: seconds per call, seconds per prompt, prefill seconds (one new token), decode tokens per
second, and peak memory.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence

import torch


def build_enhancer(device: str):
    from diffusers import Ideogram4PromptEnhancerHead
    from diffusers.pipelines.ideogram4.prompt_enhancer import build_prompt_enhancer
    from transformers import Qwen3VLConfig, Qwen3VLModel

    from worker.bench.models import QWEN3_VL_8B_TEXT

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            encoder = Qwen3VLModel(Qwen3VLConfig(text_config=QWEN3_VL_8B_TEXT, vision_config={
                "depth": 1, "hidden_size": 64, "intermediate_size": 128, "num_heads": 2, "out_hidden_size": 4096,
                "deepstack_visual_indexes": [0]})).eval()
            head = Ideogram4PromptEnhancerHead(hidden_size=4096, vocab_size=QWEN3_VL_8B_TEXT["vocab_size"]).eval()
    finally:
        torch.set_default_dtype(previous)
    return build_prompt_enhancer(encoder, head)


@torch.no_grad()
def timed_call(enhancer, batch: int, prompt_tokens: int, new_tokens: int, device: str) -> float:
    ids = torch.randint(1000, 100_000, (batch, prompt_tokens), device=device)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = enhancer.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                            min_new_tokens=new_tokens, do_sample=True, temperature=1.0, top_k=None, top_p=None,
                            eos_token_id=None, pad_token_id=0, use_cache=True)
    torch.cuda.synchronize()
    assert out.shape[1] == prompt_tokens + new_tokens
    return time.perf_counter() - t0


def run(batches: Sequence[int], prompt_tokens: int, new_tokens: int, repeats: int, device: str) -> list[dict]:
    enhancer = build_enhancer(device)
    timed_call(enhancer, 1, prompt_tokens, 8, device)  # warm-up: kernels, allocator
    rows = []
    for batch in batches:
        torch.cuda.reset_peak_memory_stats()
        prefill = min(timed_call(enhancer, batch, prompt_tokens, 1, device) for _ in range(repeats))
        call = min(timed_call(enhancer, batch, prompt_tokens, new_tokens, device) for _ in range(repeats))
        rows.append({"batch": batch, "call_s": round(call, 3), "s_per_prompt": round(call / batch, 3),
                     "prefill_s": round(prefill, 3),
                     "decode_tokens_per_s": round(batch * (new_tokens - 1) / max(call - prefill, 1e-9), 1),
                     "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="letterpress bench magic-prompt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", default="1,4,8,16", help="batch sizes, side by side")
    p.add_argument("--prompt-tokens", type=int, default=1700)
    p.add_argument("--new-tokens", type=int, default=400, help="a caption's length in tokens, about")
    p.add_argument("--repeats", type=int, default=2, help="the best of this many calls")
    p.add_argument("--json", help="write the rows here")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("the enhancer bench needs a CUDA GPU")
    print(f"device: {torch.cuda.get_device_name()}; prompt {args.prompt_tokens} tokens, answer {args.new_tokens}")
    rows = run([int(b) for b in args.batches.split(",")], args.prompt_tokens, args.new_tokens, args.repeats, "cuda")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "prompt_tokens": args.prompt_tokens,
                       "new_tokens": args.new_tokens, "rows": rows}, f, indent=2)
    return 0
