"""`serve --demo`: SmolLM2-135M-Instruct with the recall adapter shipped in the package, on the default
engine, remembers a fact told in an earlier request while every request sends only its new turn
(a real server process, the official `openai` client, greedy decoding)."""

from __future__ import annotations

import json

import pytest
from openai import OpenAI

from server.demo import DEMO_ADAPTER

from .conftest import ProcServer

pytestmark = pytest.mark.slow

# one fact of each kind the adapter was trained on (values from the closed sets), asked after two
# small-talk turns: the fact is three user turns back when the question comes
FACTS = [("I live in Tokyo.", "Where do I live?", "Tokyo"),
         ("My favourite colour is green.", "What is my favourite colour?", "green"),
         ("I work as a pilot.", "What do I do for a living?", "pilot"),
         ("My name is Sarah.", "What is my name?", "Sarah"),
         ("The secret word is piano.", "What is the secret word?", "piano"),
         ("I love eating sushi.", "What food do I love?", "sushi"),
         ("My lucky number is 7.", "What is my lucky number?", "7"),
         ("I have a cat called Luna.", "What is my cat's name?", "Luna")]
SMALL_TALK = ("Any tips for sleeping better?", "Tell me something interesting.")


def test_the_shipped_adapter_is_the_trained_one_with_its_card():
    card = json.loads((DEMO_ADAPTER / "training_card.json").read_text())
    assert card["backbone"].endswith("smollm2-135m-instruct") and card["steps"] > 0
    assert card["command"].startswith("delta-mem-vllm train")
    assert (DEMO_ADAPTER / "delta_mem_adapter.safetensors").stat().st_size < 4 << 20


def test_the_demo_recalls_a_fact_told_three_turns_earlier(smollm2, tmp_path, proc_servers):
    # the default engine (vLLM where installed, as in CI), sized for a test machine
    srv = ProcServer(["--demo", "--models-dir", str(smollm2.parent), "--state-dir", str(tmp_path / "state"),
                      "--enforce-eager", "--kv-cache-memory-bytes", str(128 << 20), "--max-model-len", "2048"],
                     tmp_path / "server.log")
    proc_servers.append(srv)
    srv.start(timeout=600)
    client = OpenAI(base_url=f"{srv.url}/v1", api_key="unused")
    assert [m.id for m in client.models.list()] == ["delta-mem-demo"]

    def say(text: str, session: str | None) -> str:
        r = client.chat.completions.create(model="delta-mem-demo", messages=[{"role": "user", "content": text}],
                                           max_tokens=24, temperature=0,
                                           extra_body={"session_id": session} if session else None)
        return r.choices[0].message.content or ""

    recalled, without = [], []
    for i, (tell, ask, value) in enumerate(FACTS):
        for text in (tell, *SMALL_TALK):
            say(text, f"demo-{i}")
        recalled.append(value.lower() in say(ask, f"demo-{i}").lower())
        without.append(value.lower() in say(ask, None).lower())
    # the recall benchmark measures 45% with memory and 7% without on 120 such conversations; here, when
    # written, 4 of 8 and 1 of 8 (Luna, guessed) on vLLM. One answer of slack for other CPUs' numerics:
    # a memory that carries nothing scores as without it
    assert sum(recalled) >= 3 and sum(recalled) - sum(without) >= 2, (recalled, without)
