"""`serve --demo`: SmolLM2-135M-Instruct with the recall adapter shipped in the package, on the default
engine, remembers a fact told in an earlier request while every request sends only its new turn
(a real server process, the official `openai` client, greedy decoding); and everything the README
and the demo's own "try this" show a newcomer is what the demo really answers, in fp32 (CPUs without
native bf16) and in bf16 (those with it: `--dtype auto`)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import subprocess
from typing import Iterator

import pytest
from openai import OpenAI

from server.demo import DEMO_ADAPTER, DEMO_SNIPPET

from .conftest import REPO, ProcServer

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


# --- what a newcomer is shown ----------------------------------------------------------------------
def readme_blocks(kind: str) -> list[str]:
    """The fenced blocks of README.md marked `<!-- demo: KIND -->`, in order."""
    text = (REPO / "README.md").read_text()
    return re.findall(rf"<!-- demo: {kind} -->\n```[a-z]*\n(.*?)```", text, flags=re.S)


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def demo(request, smollm2, tmp_path_factory) -> Iterator[ProcServer]:
    """`serve --demo` as the README starts it (no sizing flag), eager for a quick start, per dtype."""
    tmp = tmp_path_factory.mktemp(f"demo-{request.param}")
    srv = ProcServer(["--demo", "--models-dir", str(smollm2.parent), "--state-dir", str(tmp / "state"),
                      "--enforce-eager", "--dtype", request.param], tmp / "server.log")
    try:
        yield srv.start(timeout=600)
    finally:
        srv.kill()


def test_the_readme_marks_what_it_shows():
    assert len(readme_blocks("transcript")) >= 2
    assert len(readme_blocks("python")) == len(readme_blocks("prints")) >= 2
    assert readme_blocks("python")[0] == DEMO_SNIPPET   # the snippet `serve --demo` prints when ready


def test_the_readme_conversations_are_what_the_demo_says(demo):
    client = OpenAI(base_url=f"{demo.url}/v1", api_key="unused", max_retries=0)
    for n, block in enumerate(readme_blocks("transcript")):
        session, reply = f"readme-{n}", None
        for line in block.strip().splitlines():
            role, _, text = line.partition(": ")
            if role.endswith("user"):
                r = client.chat.completions.create(
                    model="delta-mem-demo", messages=[{"role": "user", "content": text}], max_tokens=24,
                    temperature=0, extra_body=None if role.startswith("(no session)") else {"session_id": session})
                reply = r.choices[0].message.content
            else:
                assert role == "assistant" and reply == text, (block, line, reply)


def test_the_readme_snippets_print_what_it_says(demo):
    namespace: dict = {}
    for code, expected in zip(readme_blocks("python"), readme_blocks("prints")):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(code.replace("http://127.0.0.1:8000", demo.url), namespace)   # noqa: S102 - our README
        assert out.getvalue() == expected, (code, out.getvalue())


def test_a_ready_demo_prints_a_try_this_that_works(demo):
    log = demo.log_path.read_text()
    assert f"The demo is ready at {demo.url}" in log
    curls = [line.strip() for line in log.splitlines() if line.strip().startswith("curl -s ")]
    assert len(curls) == 3 and DEMO_SNIPPET.replace("http://127.0.0.1:8000", demo.url).splitlines()[2] in log
    replies = [json.loads(subprocess.run(shlex.split(c.split("  #")[0]), capture_output=True, text=True, check=True,
                                         timeout=60).stdout) for c in curls]
    assert [r["choices"][0]["message"]["content"] for r in replies[:2]] == [
        "Your secret word is piano.", "The secret word is piano."]
    assert replies[2]["id"] == "try-1" and replies[2]["turns"] == 2
