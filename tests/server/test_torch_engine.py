"""TorchEngine against DeltaMemModel directly: tokens, states, written/pending tokens, isolation,
interleaving, chunking, read-only, stop conditions and aborts."""

from __future__ import annotations

import asyncio
import contextlib

import torch

from server.engine.base import GenerationRequest, MemorySpec, SamplingParams
from server.engine.torch_engine import TorchEngine
from tests.server.conftest import reference_turn


def greedy(n: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0, **kw)


async def collect(engine: TorchEngine, req: GenerationRequest):
    outs = [o async for o in engine.generate(req)]
    return outs, outs[-1]


def with_engine(dm_tok, coro_fn, **kw):
    dm, tok = dm_tok
    engine = TorchEngine(dm, tok, model_name="tiny", **kw)

    async def go():
        await engine.start()
        try:
            return await coro_fn(engine)
        finally:
            await engine.stop()
    return asyncio.run(go())


def test_matches_reference_with_write_start_and_initial_state(dm_tok):
    dm, tok = dm_tok
    prompt = tok.encode("the memory of the past, the present", add_special_tokens=False)
    init = torch.randn(dm.state_shape, generator=torch.Generator().manual_seed(1)) * 0.1
    gen, ref_state = reference_turn(dm, tok, prompt, init, 5, 12)

    async def go(engine):
        req = GenerationRequest("r", prompt, greedy(12, ignore_eos=True), MemorySpec(init, write_start=5))
        return await collect(engine, req)

    outs, final = with_engine(dm_tok, go)
    assert [t for o in outs for t in o.token_ids] == gen
    assert final.finish_reason == "length" and final.completion_tokens == 12 and final.prompt_tokens == len(prompt)
    assert final.written_token_ids == prompt[5:] + gen[:-1]
    assert final.pending_token_ids == gen[-1:]
    torch.testing.assert_close(final.final_state, ref_state, atol=1e-5, rtol=0)
    assert final.final_state.dtype == torch.float32


def test_prefill_chunking_does_not_change_results(dm_tok):
    prompt = list(range(3, 80))

    async def go(engine):
        req = GenerationRequest("r", prompt, greedy(6, ignore_eos=True), MemorySpec(None, write_start=10))
        return (await collect(engine, req))[1]

    a = with_engine(dm_tok, go, prefill_chunk=7)
    b = with_engine(dm_tok, go, prefill_chunk=512)
    assert a.written_token_ids == b.written_token_ids
    torch.testing.assert_close(a.final_state, b.final_state, atol=1e-5, rtol=0)


def test_concurrent_requests_are_isolated_and_interleaved(dm_tok):
    dm, _ = dm_tok
    g = torch.Generator().manual_seed(7)
    reqs = [GenerationRequest(f"r{i}", list(range(5 + i, 30 + 3 * i)), greedy(15, ignore_eos=True),
                              MemorySpec(torch.randn(dm.state_shape, generator=g) * 0.2, write_start=i))
            for i in range(4)]

    async def alone(engine):
        return [(await collect(engine, r))[1] for r in reqs]

    async def together(engine):
        arrivals: list[str] = []

        async def run(r):
            outs = []
            async for o in engine.generate(r):
                arrivals.append(r.request_id)
                outs.append(o)
            return outs[-1]
        finals = await asyncio.gather(*(run(r) for r in reqs))
        return finals, arrivals

    solo = with_engine(dm_tok, alone)
    finals, arrivals = with_engine(dm_tok, together)
    for a, b in zip(solo, finals):
        assert a.written_token_ids == b.written_token_ids and a.pending_token_ids == b.pending_token_ids
        torch.testing.assert_close(a.final_state, b.final_state, atol=1e-6, rtol=0)
    # round-robin: the last request streams before the first one is done
    assert arrivals.index("r3") < len(arrivals) - 1 - arrivals[::-1].index("r0")


def test_read_only_request_leaves_state_bit_identical(dm_tok):
    dm, _ = dm_tok
    init = torch.randn(dm.state_shape, generator=torch.Generator().manual_seed(3))

    async def go(engine):
        req = GenerationRequest("r", list(range(3, 20)), greedy(5, ignore_eos=True), MemorySpec(init, write=False))
        return (await collect(engine, req))[1]

    final = with_engine(dm_tok, go)
    assert torch.equal(final.final_state, init) and final.written_token_ids == []


def test_stop_conditions(dm_tok):
    dm, tok = dm_tok
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    a_id = tok.convert_tokens_to_ids("a")

    async def go(engine):
        # forced EOS: stop, nothing fed, the EOS is pending and not in the text
        _, f1 = await collect(engine, GenerationRequest("e", [1, 2, 3], greedy(5, logit_bias={eos: 100.0})))
        # a stop string made of forced tokens
        _, f2 = await collect(engine, GenerationRequest(
            "s", [1, 2, 3], greedy(20, stop=("aaa",), logit_bias={a_id: 100.0})))
        # the context limit caps the completion
        _, f3 = await collect(engine, GenerationRequest("l", list(range(1, 60)), greedy(50, ignore_eos=True)))
        return f1, f2, f3

    f1, f2, f3 = with_engine(dm_tok, go, max_model_len=64)
    assert f1.finish_reason == "stop" and f1.pending_token_ids == [eos] and f1.completion_tokens == 1
    assert f1.written_token_ids == [1, 2, 3]
    assert f2.finish_reason == "stop" and f2.completion_tokens == 3 and f2.pending_token_ids == [a_id]
    assert f3.finish_reason == "length" and f3.completion_tokens == 64 - 59


def test_abort_and_stop(dm_tok):
    async def go(engine):
        gen = engine.generate(GenerationRequest("long", [1, 2, 3], greedy(10_000, ignore_eos=True)))
        n = 0
        async with contextlib.aclosing(gen):
            async for _ in gen:
                n += 1
                if n == 3:
                    break
        for _ in range(100):
            if engine.health()["active_requests"] == 0:
                break
            await asyncio.sleep(0.01)
        assert engine.health()["active_requests"] == 0
        # the engine keeps serving
        _, f = await collect(engine, GenerationRequest("next", [1, 2], greedy(2, ignore_eos=True)))
        assert f.finish_reason == "length"
        # stopping the engine ends in-flight requests with "abort"
        outs = []

        async def consume():
            async for o in engine.generate(GenerationRequest("x", [1, 2], greedy(10_000, ignore_eos=True))):
                outs.append(o)
        task = asyncio.create_task(consume())
        while not outs:
            await asyncio.sleep(0.01)
        await engine.stop()
        await asyncio.wait_for(task, 10)
        return outs[-1]

    last = with_engine(dm_tok, go)
    assert last.finished and last.finish_reason == "abort" and last.final_state is None


def test_decode_is_batched_across_requests_without_cross_talk(dm_tok):
    """Requests of different lengths, one read-only, decode in batched forwards; each row equals its solo run."""
    dm, _ = dm_tok
    g = torch.Generator().manual_seed(11)
    init = [torch.randn(dm.state_shape, generator=g) * 0.3 for _ in range(3)]
    reqs = [GenerationRequest("w0", list(range(7, 19)), greedy(9, ignore_eos=True), MemorySpec(init[0])),
            GenerationRequest("ro", list(range(40, 71)), greedy(9, ignore_eos=True), MemorySpec(init[1], write=False)),
            GenerationRequest("w2", list(range(3, 8)), greedy(9, ignore_eos=True), MemorySpec(init[2], write_start=2))]

    async def alone(engine):
        return [(await collect(engine, r))[1] for r in reqs]

    async def together(engine):
        finals = await asyncio.gather(*(collect(engine, r) for r in reqs))
        return [f for _, f in finals], engine.batched_decode_steps

    solo = with_engine(dm_tok, alone)
    finals, batched = with_engine(dm_tok, together)
    assert batched >= 8, "decode steps of concurrent requests run as batches"
    for a, b in zip(solo, finals):
        assert a.written_token_ids == b.written_token_ids and a.pending_token_ids == b.pending_token_ids
        torch.testing.assert_close(b.final_state, a.final_state, atol=1e-6, rtol=0)
    assert torch.equal(finals[1].final_state, init[1]), "a read-only row in a batch never writes"
