"""Segment-write adapters (message_mean / sentence_mean) served by the embedded engine.

Segment means depend on call boundaries, so the engine runs a segment adapter's prompt as one call
(whatever its prefill chunk) and each generated token as its own one-token segment; the server
assigns the ids (pending tokens first, then one segment per new message or sentence).
"""

from __future__ import annotations

import asyncio

import httpx
import pytest
import torch
from transformers import AutoTokenizer

from delta_mem_vllm.config import DeltaMemConfig
from delta_mem_vllm.hf import DeltaMemModel
from delta_mem_vllm.testing.adapters import save_random_adapter
from server.engine.base import EngineError, GenerationRequest, MemorySpec, SamplingParams
from server.engine.torch_engine import TorchEngine
from server.prompt import ChatMessage, build_chat_turn, build_text_turn
from tests.server.conftest import ThreadServer, make_settings


@pytest.fixture(scope="module", params=["message_mean", "sentence_mean"])
def segment_paths(request, tiny_paths, tmp_path_factory):
    model_dir, _ = tiny_paths
    cfg = DeltaMemConfig(delta_heads=("q", "o"), memory_write_granularity=request.param)
    adapter = save_random_adapter(model_dir, tmp_path_factory.mktemp(request.param), config=cfg, seed=3)
    return model_dir, adapter


@pytest.fixture(scope="module")
def segment_dm(segment_paths):
    model_dir, adapter = segment_paths
    return DeltaMemModel.from_pretrained(model_dir, adapter, attn_implementation="sdpa"), \
        AutoTokenizer.from_pretrained(model_dir)


def replay(dm, vocab, prompt, msg, sent, state, write_start, n):
    """Greedy by hand: the prompt in one call with its ids, then one call per generated token."""
    out = dm(torch.tensor([prompt]), state=state[None], write_start=write_start, use_cache=True,
             message_ids=torch.tensor([msg]), sentence_ids=torch.tensor([sent]))
    gen = []
    for _ in range(n):
        gen.append(int(out.logits[0, -1, :vocab].argmax()))   # the engine never samples ids ≥ len(tokenizer)
        if len(gen) == n:
            break
        out = dm(torch.tensor([[gen[-1]]]), state=out.state, past_key_values=out.past_key_values, use_cache=True,
                 message_ids=torch.tensor([[0]]), sentence_ids=torch.tensor([[0]]))
    return gen, out.state[0]


def test_segment_ids_of_a_turn(segment_dm) -> None:
    _, tok = segment_dm
    msgs = [ChatMessage("system", "Be brief."), ChatMessage("user", "Hi there. How are you?"),
            ChatMessage("assistant", "Fine."), ChatMessage("user", "Good. Bye.")]
    turn = build_chat_turn(tok, msgs, 2, pending=[290], granularity="sentence_mean")
    n_ctx = turn.num_context
    assert turn.message_ids[:n_ctx] == (-1,) * n_ctx            # read-only context: no segment
    assert turn.message_ids[n_ctx] == 0 and turn.sentence_ids[n_ctx] == 0   # the pending token first
    new = turn.message_ids[n_ctx + 1:]
    # conversation ordinals (system excluded) shifted past the pending segment; generation prompt none
    assert set(new) == {2, 3, -1} and new[-3:] == (-1, -1, -1)
    assert sorted(set(turn.sentence_ids[n_ctx + 1:]) - {-1}) == [3, 4, 5]   # "Fine." / "Good." / " Bye."
    assert build_chat_turn(tok, msgs, 2, granularity="token").message_ids is None
    text = build_text_turn([5, 6, 7], pending=[290], granularity="message_mean")
    assert text.message_ids == (0, 1, 1, 1)


def test_engine_runs_segment_prompts_as_one_call(segment_dm) -> None:
    dm, tok = segment_dm
    msgs = [ChatMessage("user", "The cat sat. The dog ran!"), ChatMessage("assistant", "Yes."),
            ChatMessage("user", "What ran?")]
    turn = build_chat_turn(tok, msgs, 2, pending=[290], granularity=dm.config.memory_write_granularity)
    init = torch.randn(dm.state_shape, generator=torch.Generator().manual_seed(2)) * 0.1
    gen, ref_state = replay(dm, len(tok), turn.token_ids, list(turn.message_ids), list(turn.sentence_ids), init,
                            turn.write_start, 6)
    engine = TorchEngine(dm, tok, model_name="tiny", prefill_chunk=4)   # chunking must not matter

    async def go():
        await engine.start()
        try:
            spec = MemorySpec(init, write_start=turn.write_start, message_ids=turn.message_ids,
                              sentence_ids=turn.sentence_ids)
            req = GenerationRequest("s", turn.token_ids, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True),
                                    spec)
            outs = [o async for o in engine.generate(req)]
            with pytest.raises(EngineError, match="needs message and sentence ids"):
                async for _ in engine.generate(GenerationRequest("t", turn.token_ids, SamplingParams(max_tokens=1))):
                    pass
            return outs
        finally:
            await engine.stop()

    outs = asyncio.run(go())
    assert [t for o in outs for t in o.token_ids] == gen
    torch.testing.assert_close(outs[-1].final_state, ref_state, atol=1e-5, rtol=0)
    token_mode = dm(torch.tensor([turn.token_ids]), state=init[None], write_start=turn.write_start).state[0]
    assert (token_mode - ref_state).abs().max() > 1e-3, "segment writes differ from token writes"


def test_served_segment_adapter_sessions(segment_paths, tmp_path) -> None:
    server = ThreadServer(make_settings(segment_paths, tmp_path / "state")).start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for text in ["I live in Oslo. It is cold.", "Where do I live?"]:
                r = http.post("/v1/chat/completions", json={
                    "model": "tiny", "messages": [{"role": "user", "content": text}], "max_tokens": 4,
                    "temperature": 0, "session_id": "seg-1"})
                assert r.status_code == 200, r.text
                assert r.json()["delta_mem"]["committed"] is True
            info = http.get("/v1/sessions/seg-1").json()
            assert info["version"] == 2 and info["turns"] == 2 and max(info["state_norms"]) > 0
    finally:
        server.stop()
