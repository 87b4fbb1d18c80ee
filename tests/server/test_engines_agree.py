"""The vLLM engine and the embedded engine agree through the HTTP API (official `openai` client).

One multi-session, memory-mode script — sessions interleaved, a read-only turn, a reset, a fork, a
stateless request, then every session's next turn sent concurrently — runs against a server on each
engine, on tiny random Qwen3, Qwen2, Llama and SmolLM3 with random non-zero adapters. Prompts are
chunked (16 tokens per step on vLLM, 16-token prefill chunks on the embedded engine). Greedy tokens,
prompts and session records must be identical, stored states equal within 1e-5 (fp32)."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest
import torch

from tests.server.conftest import ThreadServer, export_state, make_settings, requires_vllm
from tests.server.test_vllm_engine import CASES, build_pair

pytestmark = requires_vllm

SYS = {"role": "system", "content": "You keep notes for the user."}
LONG = "The meeting moved to Thursday at nine, room 4B, bring the quarterly figures and the badge. " * 2


def ask(client: openai.OpenAI, content: str, session: str | None, **extra):
    messages = ([SYS] if session else []) + [{"role": "user", "content": content}]
    reply = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=7, temperature=0,
        extra_body={"return_token_ids": True, **({"session_id": session} if session else {}), **extra})
    choice = reply.choices[0]
    return {"prompt": reply.model_extra["prompt_token_ids"], "tokens": choice.model_extra["token_ids"],
            "text": choice.message.content, "finish": choice.finish_reason, "memory": reply.model_extra["delta_mem"]}


async def ask_async(client: openai.AsyncOpenAI, content: str, session: str):
    reply = await client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": content}], max_tokens=6, temperature=0,
        extra_body={"return_token_ids": True, "session_id": session})
    return reply.model_extra["prompt_token_ids"], reply.choices[0].model_extra["token_ids"]


def run_script(url: str) -> dict:
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    log = [
        ask(client, "My name is Ada and I live in Lyon.", "A"),
        ask(client, LONG, "B"),                                            # chunked prompt
        ask(client, "I like green tea.", "A"),
        ask(client, "When is the meeting?", "B", delta_mem={"write": False}),   # read-only
    ]
    with httpx.Client(base_url=url, timeout=60) as http:
        assert http.post("/v1/sessions/A/fork", json={"id": "C"}).status_code == 200
        log.append(ask(client, "What do I drink?", "C"))
        log.append(ask(client, "Forget it all. What is my name?", "A", delta_mem={"reset": True}))
        log.append(ask(client, "Remind me of the room.", "B"))
        log.append(ask(client, "A request without a session.", None))

        async def together() -> list:
            aclient = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            try:
                return await asyncio.gather(*(ask_async(aclient, f"Next turn for {s}.", s) for s in "ABC"))
            finally:
                await aclient.close()

        log.append(asyncio.run(together()))
        sessions = {s: http.get(f"/v1/sessions/{s}").json() for s in "ABC"}
        states = {s: export_state(http, s) for s in "ABC"}
    return {"log": log, "sessions": sessions, "states": states}


@pytest.fixture(scope="module", params=sorted(CASES), ids=lambda a: a)
def pair(request, tmp_path_factory):
    return build_pair(tmp_path_factory.mktemp(request.param), request.param, CASES[request.param])


def test_engines_agree_over_http(pair, tmp_path):
    results, identities = {}, {}
    for engine in ("torch", "vllm"):
        settings = make_settings(pair, tmp_path / engine, engine=engine, prefill_chunk=16, max_num_batched_tokens=16)
        server = ThreadServer(settings).start()
        try:
            eng = server.ctx.engine
            identities[engine] = (eng.model_fingerprint, eng.adapter_fingerprint, eng.layer_names, eng.state_shape,
                                  eng.eos_token_ids, eng.max_model_len)
            results[engine] = run_script(server.url)
        finally:
            server.stop()
    # the same identity for the same model and adapter: a session's state moves between the engines
    assert identities["vllm"] == identities["torch"]
    torch_run, vllm_run = results["torch"], results["vllm"]
    assert vllm_run["log"] == torch_run["log"]
    assert [entry["memory"]["committed"] for entry in torch_run["log"][:8]] == [True, True, True, False, True, True,
                                                                                True, False]
    for sid in "ABC":
        a, b = torch_run["sessions"][sid], vllm_run["sessions"][sid]
        for key in ("version", "turns", "tokens_written", "written_digest", "pending_tokens", "written_token_ids"):
            assert a[key] == b[key], (sid, key)
        torch.testing.assert_close(vllm_run["states"][sid], torch_run["states"][sid], atol=1e-5, rtol=0)
