"""K1: the chunked torch scan equals the per-token reference for any R, T, chunking and masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from delta_mem_vllm.ops.scan import scan, scan_chunked, scan_reference


def inputs(N: int, T: int, R: int, seed: int = 0, normalized: bool = True):
    g = torch.Generator().manual_seed(seed)
    rn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    q, k = rn(N, T, R), rn(N, T, R)
    if normalized:
        q, k = F.normalize(torch.tanh(q), dim=-1), F.normalize(torch.tanh(k), dim=-1)
    v = rn(N, T, R)
    beta = torch.sigmoid(rn(N, T, R) - 1)
    lam = torch.sigmoid(rn(N, T, R) + 1)
    return rn(N, R, R) * 0.5, q, k, v, lam, lam * beta, beta


def maxabs(t: torch.Tensor) -> float:
    return t.abs().max().item() if t.numel() else 0.0


@pytest.mark.parametrize("R", [1, 2, 8, 16, 64, 128])
@pytest.mark.parametrize("T", [0, 1, 5, 37])
def test_k1_chunked_equals_reference(R: int, T: int) -> None:
    args = inputs(3, T, R, seed=R + T)
    g = torch.Generator().manual_seed(1)
    valid = torch.rand(3, T, generator=g) > 0.15
    writes = torch.rand(3, T, generator=g) > 0.2
    ref_s, ref_r = scan_reference(*args, valid, writes)
    for chunk in (1, 4, 16, 64):
        s, r = scan_chunked(*args, valid, writes, chunk_size=chunk)
        assert maxabs(s - ref_s) <= 1e-5 * max(1.0, maxabs(ref_s))
        assert maxabs(r - ref_r) <= 1e-5 * max(1.0, maxabs(ref_r))
        assert r.shape == (3, T, R)
    assert torch.all(ref_r[~valid] == 0)


def test_long_sequence_and_extreme_gates_stay_accurate() -> None:
    s0, q, k, v, keep, erase, write = inputs(2, 700, 8, seed=3)
    keep[:, ::7] = 1e-12      # near-total forgetting
    keep[:, 3::11] = 1.0      # no decay (no_lambda-like)
    ref = scan_reference(s0, q, k, v, keep, erase, write)
    got = scan_chunked(s0, q, k, v, keep, erase, write)
    assert (got[0] - ref[0]).abs().max() < 1e-5 and (got[1] - ref[1]).abs().max() < 1e-5


def test_masked_steps_leave_state_untouched() -> None:
    s0, *rest = inputs(2, 9, 4, seed=5)
    none = torch.zeros(2, 9, dtype=torch.bool)
    for fn in (scan_reference, scan_chunked):
        s, r = fn(s0, *rest, valid=None, writes=none)
        assert torch.equal(s, s0)
        s, r = fn(s0, *rest, valid=none)
        assert torch.equal(s, s0) and torch.count_nonzero(r) == 0


def test_dispatch_rejects_unknown_impl() -> None:
    with pytest.raises(ValueError, match="unknown scan impl"):
        scan(*inputs(1, 3, 2), impl="cuda")


def test_single_token_fast_path_equals_reference() -> None:
    args = inputs(6, 1, 8, seed=9)
    valid = torch.tensor([[1], [1], [0], [1], [0], [1]], dtype=torch.bool)
    writes = torch.tensor([[1], [0], [1], [1], [0], [0]], dtype=torch.bool)
    every = torch.ones(6, 1, dtype=torch.bool)
    for v, w in ((None, None), (valid, None), (None, writes), (valid, writes)):
        got, want = scan(*args, v, w), scan_reference(*args, v, w)
        assert (got[0] - want[0]).abs().max() <= 1e-6 and (got[1] - want[1]).abs().max() <= 1e-6
        kept = ~((every if v is None else v) & (every if w is None else w))[:, 0]
        assert torch.equal(got[0][kept], args[0][kept])            # non-writing rows: bit-identical
