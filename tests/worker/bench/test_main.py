"""`python -m worker.bench`: the first argument picks the command (profile, e2e-worker, else the bench itself)."""
from __future__ import annotations

import pytest
import torch

from worker.bench.__main__ import main


@pytest.mark.parametrize("argv, prog, option", [
    (["--help"], "usage: letterpress bench ", "--e2e-only"),
    (["profile", "--help"], "usage: letterpress bench profile ", "--fused"),
    (["e2e-worker", "--help"], "usage: bench e2e-worker ", "--random-real"),
    (["matmuls", "--help"], "usage: letterpress bench matmuls ", "--no-linears"),
])
def test_dispatch(capsys, argv, prog, option):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(prog) and option in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the command measures instead")
def test_matmuls_says_it_needs_cuda(capsys):
    """The matmul rates are a GPU measurement: on a CPU machine the command refuses with a reason, not a table."""
    assert main(["matmuls"]) == 2
    assert "needs CUDA" in capsys.readouterr().err
