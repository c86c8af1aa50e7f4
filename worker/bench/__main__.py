"""`python -m worker.bench ...`: the bench's command line (what `letterpress bench ...` runs).

    python -m worker.bench [options]              # every path side by side (worker.bench.paths; `--help`)
    python -m worker.bench profile [options]      # where one step's time goes (worker.bench.profile)
    python -m worker.bench e2e-worker [options]   # the worker process `--e2e` starts (worker.bench.e2e)
    python -m worker.bench adapters [options]     # what a LoRA adapter costs (worker.bench.adapters)
    python -m worker.bench magic-prompt [options] # what the prompt enhancer costs (worker.bench.magic_prompt)
    python -m worker.bench fp8-attention [options] # cuDNN fp8 SDPA at 256-wide heads (worker.bench.fp8_attention)
    python -m worker.bench matmuls [options]      # bf16 / fp8 / int8 rates of a block's linears (worker.bench.matmuls)
    python -m worker.bench memory-plans [options] # peak memory of every memory plan (worker.bench.memory_plans)
    python -m worker.bench previews [options]     # what a preview costs a generation (worker.bench.previews)
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from worker.bench import adapters, e2e, fp8_attention, magic_prompt, matmuls, memory_plans, paths, previews, profile


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["e2e-worker"]:
        return e2e.worker_main(argv[1:])
    if argv[:1] == ["adapters"]:  # `letterpress bench adapters ...`: LoRA step cost and switch times
        return adapters.main(argv[1:])
    if argv[:1] == ["magic-prompt"]:  # `letterpress bench magic-prompt ...`: enhancer seconds and tokens/s
        return magic_prompt.main(argv[1:])
    if argv[:1] == ["fp8-attention"]:  # `letterpress bench fp8-attention ...`: fp8 against bf16 attention
        return fp8_attention.main(argv[1:])
    if argv[:1] == ["matmuls"]:  # `letterpress bench matmuls ...`: what the block's linears reach per dtype
        return matmuls.main(argv[1:])
    if argv[:1] == ["memory-plans"]:  # `letterpress bench memory-plans ...`: peak memory of each plan
        return memory_plans.main(argv[1:])
    if argv[:1] == ["previews"]:  # `letterpress bench previews ...`: seconds a preview adds
        return previews.main(argv[1:])
    if argv[:1] == ["profile"]:  # `letterpress bench profile ...`: where a step's time goes
        return profile.main(argv[1:])
    return paths.main(argv)


if __name__ == "__main__":
    sys.exit(main())
