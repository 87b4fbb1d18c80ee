"""The method's conformance checks on real (tiny, random) transformers models: F6, S1–S7, C5, batch independence."""

from __future__ import annotations

import pytest
import torch

from delta_mem_vllm.config import DeltaMemConfig
from delta_mem_vllm.hf import DeltaMemModel
from delta_mem_vllm.ops.scan import scan_reference, update_coefficients
from delta_mem_vllm.testing.tiny import TINY_ARCHS, build_tiny_model

from .helpers import VARIANTS, make_dm, rand_ids
from .naive_delta_mem import layer_params, naive_forward

TOL = 1e-5


def close(a: torch.Tensor, b: torch.Tensor, tol: float = TOL) -> float:
    err = (a.float() - b.float()).abs().max().item()
    assert err <= tol, f"max abs diff {err:.3g} > {tol:g}"
    return err


def random_state(dm: DeltaMemModel, batch: int, seed: int = 0, scale: float = 0.5) -> torch.Tensor:
    return torch.randn((batch, *dm.state_shape), generator=torch.Generator().manual_seed(seed)) * scale


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_f6_naive_reimplementation_matches(arch: str, variant: str) -> None:
    dm = make_dm(arch, variant)
    ids = rand_ids(1, 12, seed=3)
    s0 = random_state(dm, 1, seed=4)
    with torch.no_grad():
        out = dm(ids, state=s0, write_start=3)
    ref_logits, ref_state = naive_forward(dm.model, layer_params(dm), dm.config, ids[0].tolist(),
                                          state={i: s0[0, i] for i in range(len(dm.layers))}, write_from=3)
    close(out.logits[0], ref_logits)
    close(out.state[0], torch.stack([ref_state[i] for i in range(len(dm.layers))]))
    assert out.state.abs().max() > 0.05, "memory path must be active"


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch,variant", [("qwen3", "released_like"), ("llama", "state_heads_4"),
                                          ("smollm3", "lambda_outside_uncoupled"), ("qwen2", "qkvo_heads")])
def test_s1_chunking_invariance(arch: str, variant: str, attn: str) -> None:
    dm = make_dm(arch, variant, attn=attn)
    ids = rand_ids(2, 24, seed=1)
    s0 = random_state(dm, 2, seed=2)
    with torch.no_grad():
        full = dm(ids, state=s0)
        for cuts in ([10], [5, 11, 17], list(range(1, 24))):
            state, cache, logits = s0, None, []
            for a, b in zip([0, *cuts], [*cuts, 24]):
                o = dm(ids[:, a:b], state=state, past_key_values=cache, use_cache=True)
                state, cache = o.state, o.past_key_values
                logits.append(o.logits)
            close(torch.cat(logits, 1), full.logits)
            close(state, full.state)


def test_s2_state_defaults_and_shape() -> None:
    dm = make_dm("qwen3", "state_heads_4")
    ids = rand_ids(2, 6)
    with torch.no_grad():
        a = dm(ids)
        b = dm(ids, state=dm.zero_state(2))
        assert a.state.shape == (2, 2, 4, 8, 8) and a.state.dtype == torch.float32
        assert torch.equal(a.logits, b.logits) and torch.equal(a.state, b.state)
        with pytest.raises(ValueError, match="state has shape"):
            dm(ids, state=dm.zero_state(3))
        first = dm(ids, use_cache=True)
        with pytest.raises(ValueError, match="cached tokens"):   # a mask must cover the cache too
            dm(ids[:, :1], attention_mask=torch.ones(2, 1), past_key_values=first.past_key_values, use_cache=True)


def test_s2_state_is_fp32_for_bf16_models() -> None:
    dm = make_dm("qwen3", dtype=torch.bfloat16)
    with torch.no_grad():
        out = dm(rand_ids(1, 8))
    assert out.state.dtype == torch.float32 and out.logits.dtype == torch.bfloat16


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_s3_padding_never_reads_or_writes(attn: str, side: str) -> None:
    dm = make_dm("qwen3", "qkvo_heads", attn=attn)
    ids = rand_ids(2, 14, seed=5)
    short = ids[1, :9]
    padded, mask = ids.clone(), torch.ones(2, 14, dtype=torch.long)
    if side == "left":
        padded[1] = torch.cat([torch.zeros(5, dtype=torch.long), short])
        mask[1, :5] = 0
        real = slice(5, 14)
    else:
        padded[1] = torch.cat([short, torch.zeros(5, dtype=torch.long)])
        mask[1, 9:] = 0
        real = slice(0, 9)
    s0 = random_state(dm, 2, seed=6)
    with torch.no_grad():
        batch = dm(padded, attention_mask=mask, state=s0)
        alone = dm(short[None], state=s0[1:])
    close(batch.logits[1, real], alone.logits[0])
    close(batch.state[1], alone.state[0])


def test_s4_read_only_keeps_state_bit_identical_and_reads_it() -> None:
    dm = make_dm("llama", "released_like")
    ids = rand_ids(1, 10, seed=7)
    s0 = random_state(dm, 1, seed=8)
    with torch.no_grad():
        out = dm(ids, state=s0, write=False)
        everything_read_only = dm(ids, state=s0, write_start=10)
    assert torch.equal(out.state, s0)
    assert torch.equal(everything_read_only.state, s0)
    ref_logits, _ = naive_forward(dm.model, layer_params(dm), dm.config, ids[0].tolist(),
                                  state={i: s0[0, i] for i in range(2)}, write=False)
    close(out.logits[0], ref_logits)
    with torch.no_grad():
        base = dm.model(ids).logits  # hooks are inert outside a DeltaMemModel call
    assert (out.logits - base).abs().max() > 1e-3, "read-only turns must still read the state"


def test_write_start_per_row_in_a_batch() -> None:
    dm = make_dm("qwen3")
    ids = rand_ids(2, 12, seed=9)
    s0 = random_state(dm, 2, seed=10)
    with torch.no_grad():
        out = dm(ids, state=s0, write_start=torch.tensor([0, 7]))
        row0 = dm(ids[:1], state=s0[:1], write_start=0)
        row1 = dm(ids[1:], state=s0[1:], write_start=7)
    close(out.state[0], row0.state[0])
    close(out.state[1], row1.state[0])
    ref_logits, ref_state = naive_forward(dm.model, layer_params(dm), dm.config, ids[1].tolist(),
                                          state={i: s0[1, i] for i in range(2)}, write_from=7)
    close(out.logits[1], ref_logits)


def test_batch_independence_with_different_states_and_lengths() -> None:
    dm = make_dm("smollm3", "scalar_gates", attn="sdpa")
    lengths = [11, 4, 8]
    rows = [rand_ids(1, n, seed=20 + i)[0] for i, n in enumerate(lengths)]
    T = max(lengths)
    ids = torch.zeros(3, T, dtype=torch.long)
    mask = torch.zeros(3, T, dtype=torch.long)
    for i, r in enumerate(rows):  # left padding, as batched generation uses
        ids[i, T - len(r):] = r
        mask[i, T - len(r):] = 1
    s0 = random_state(dm, 3, seed=30)
    with torch.no_grad():
        batch = dm(ids, attention_mask=mask, state=s0)
        for i, r in enumerate(rows):
            alone = dm(r[None], state=s0[i:i + 1])
            close(batch.logits[i, T - len(r):], alone.logits[0])
            close(batch.state[i], alone.state[0])


def test_c5_zero_output_init_equals_base_for_any_state() -> None:
    model = build_tiny_model("qwen3", seed=0)
    dm = DeltaMemModel(model, DeltaMemConfig()).eval()   # output_init="zero"
    ids = rand_ids(2, 9)
    with torch.no_grad():
        out = dm(ids, state=random_state(dm, 2, seed=1, scale=3.0))
        base = model(ids).logits
    close(out.logits, base, 1e-6)


def _layer_inputs(dm: DeltaMemModel, ids: torch.Tensor) -> list[torch.Tensor]:
    """Post-norm attention inputs of every layer for the plain backbone."""
    with torch.no_grad():
        hs = dm.model(ids, output_hidden_states=True).hidden_states
    return [dm.model.model.layers[i].input_layernorm(hs[i]) for i in range(len(dm.layers))]


def _segment_reference_state(dm: DeltaMemModel, x: torch.Tensor, seg: torch.Tensor, layer: int) -> torch.Tensor:
    """Scan over per-segment mean hiddens in ascending id order, written from the method's definition."""
    lay = dm.layers[layer]
    ids = sorted({int(s) for s in seg.tolist() if s >= 0})
    means = torch.stack([x[seg == s].mean(0) for s in ids])[None]          # [1,S,H]
    q, k, v = lay.project(means)
    keep, erase, write = lay.coefficients(means)
    h, R = dm.config.num_state_heads, dm.config.rank
    f = lambda t: t[0].permute(1, 0, 2)  # noqa: E731  [S,h,R] → [h,S,R]
    state, _ = scan_reference(torch.zeros(h, R, R), f(q), f(k), f(v), f(keep), f(erase), f(write))
    return state


@pytest.mark.parametrize("mode", ["message_mean", "sentence_mean"])
def test_s5_s6_segment_writes(mode: str) -> None:
    variant = {**VARIANTS["released_like"], "memory_write_granularity": mode, "num_state_heads": 2}
    dm = make_dm("qwen3", variant)
    ids = rand_ids(1, 20, seed=11)
    msg = torch.tensor([[-1] * 3 + [0] * 8 + [1] * 6 + [-1] * 3])
    sent = torch.tensor([[-1] * 3 + [0] * 4 + [1] * 4 + [2] * 3 + [-1] * 3 + [3] * 3])
    with torch.no_grad():
        out = dm(ids, message_ids=msg, sentence_ids=sent)
        base = dm.model(ids).logits
    assert torch.equal(out.logits, base), "a fresh-state segment call reads zeros everywhere"
    seg = msg[0] if mode == "message_mean" else torch.where(msg[0] >= 0, sent[0], -1)
    xs = _layer_inputs(dm, ids)
    for layer in range(2):
        close(out.state[0, layer], _segment_reference_state(dm, xs[layer][0], seg, layer))
    assert out.state.abs().max() > 0.01
    # no usable ids → exactly token mode
    token_dm = make_dm("qwen3", {**variant, "memory_write_granularity": "token"})
    with torch.no_grad():
        fallback = dm(ids, message_ids=torch.full_like(msg, -1), sentence_ids=sent)
        wrong_shape = dm(ids, message_ids=msg[:, :5])
        token = token_dm(ids)
    for o in (fallback, wrong_shape):
        assert torch.equal(o.logits, token.logits) and torch.equal(o.state, token.state)


def test_s5_later_calls_read_earlier_segment_writes() -> None:
    variant = {**VARIANTS["released_like"], "memory_write_granularity": "message_mean"}
    dm = make_dm("llama", variant)
    ids = rand_ids(1, 12, seed=12)
    msg = torch.tensor([[0] * 6 + [1] * 6])
    with torch.no_grad():
        first = dm(ids[:, :6], message_ids=msg[:, :6], use_cache=True)
        second = dm(ids[:, 6:], state=first.state, past_key_values=first.past_key_values,
                    message_ids=msg[:, 6:], use_cache=True)
        whole = dm(ids, message_ids=msg)
    # layer 0's inputs don't depend on memory: split and whole calls write identical layer-0 states
    close(second.state[0, 0], whole.state[0, 0])
    assert (second.logits - whole.logits[:, 6:]).abs().max() > 1e-4, "the second call reads the first's writes"


def test_s7_reset_is_a_zero_state() -> None:
    dm = make_dm("qwen3")
    ids = rand_ids(1, 7)
    with torch.no_grad():
        carried = dm(ids).state
        fresh = dm(ids, state=None)
        again = dm(ids, state=torch.zeros_like(carried))
    assert torch.equal(fresh.state, again.state) and torch.equal(fresh.logits, again.logits)


def test_update_modes_reach_the_state_as_documented() -> None:
    beta, lam = torch.tensor([0.25]), torch.tensor([0.6])
    expected = {"standard": (0.6, 0.25, 0.25), "lambda_outside": (0.6, 0.15, 0.25), "no_lambda": (1.0, 0.25, 0.25)}
    for mode, want in expected.items():
        got = update_coefficients(beta, lam, mode)
        assert torch.allclose(torch.cat(got), torch.tensor(want)), mode


def test_logits_to_keep_returns_the_last_positions_only() -> None:
    dm = make_dm("qwen3")
    ids = rand_ids(2, 9, seed=13)
    with torch.no_grad():
        full = dm(ids)
        last = dm(ids, logits_to_keep=1)
    assert last.logits.shape == (2, 1, full.logits.shape[-1])
    close(last.logits[:, 0], full.logits[:, -1], 1e-5)     # one-row vs many-row GEMM: rounding only
    assert torch.equal(last.state, full.state)
