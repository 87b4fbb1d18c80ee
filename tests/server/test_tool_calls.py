"""Tool calling: the parser and the streaming gate (pure), then tools through the HTTP API with the
official `openai` client on both engines — tool_choice named/required enforced by the grammar, auto
read back from the reply, streamed as OpenAI streams them — and the session semantics of tool calls
and tool results (written once, like every other message).

The demo model is random, so it never decides to call a tool by itself: the `auto` tests run the
embedded engine with its token choice scripted (everything else — template, prompt, memory, parser,
commit — is the real path)."""

from __future__ import annotations

import importlib.util
import json

import httpx
import jsonschema
import openai
import pytest
import torch

from server.tool_stream import ArrayCallReader, HermesCallReader, NamedCallReader
from server.tools import HermesToolParser, ToolCall, ToolUse, forced_calls_schema
from tests.server.conftest import ENGINES, ThreadServer, app_kwargs_for, assert_openai_error, make_settings

# a ChatML template that knows tools, in the Hermes/Qwen form the built-in parser reads
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n# Tools\n{%- for t in tools %}\n{{ t | tojson }}{%- endfor %}<|im_end|>\n"
    "{% endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|im_start|>assistant\n{{ m.content }}"
    "{%- for c in m.tool_calls %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Lyon", "Nice"]},
                                                    "unit": {"enum": ["C", "F"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}},
                                       "required": ["zone"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


# --- pure -------------------------------------------------------------------------------------------
def test_hermes_parser():
    parser = HermesToolParser()
    content, calls = parser.parse('Let me check.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                                  '</tool_call><tool_call>{"name": "get_time", "arguments": {}}</tool_call>')
    assert content == "Let me check." and [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Paris"} and calls[0].id != calls[1].id
    assert parser.parse("no tools here") == ("no tools here", [])
    # a block that is not a call stays content; an unterminated last block still counts
    assert parser.parse("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])
    assert [c.name for c in parser.parse('<tool_call>{"name": "f", "arguments": {"a": 1}}')[1]] == ["f"]


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="compares with vLLM's hermes parser")
def test_vllm_hermes_parser_reads_the_same_calls(dm_tok):
    from server.engine.vllm_tools import VllmToolParser

    ours, theirs = HermesToolParser(), VllmToolParser("hermes", dm_tok[1])
    for text in ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>',
                 'Sure.<tool_call>{"name": "a", "arguments": {}}</tool_call><tool_call>{"name": "b", '
                 '"arguments": {"x": [1, 2]}}</tool_call>', "plain text"]:
        (c1, k1), (c2, k2) = ours.parse(text), theirs.parse(text)
        assert c1 == c2 and [(k.name, json.loads(k.arguments)) for k in k1] == [(k.name, json.loads(k.arguments))
                                                                              for k in k2]
    with pytest.raises(ValueError, match="unknown tool call parser"):
        VllmToolParser("no-such-parser", dm_tok[1])


def _stream(reader, text: str, seed: int, tokenizer=None):
    """Feed `text` in random pieces (with their token ids when a tokenizer is given); return the
    streamed content, the calls assembled from the deltas as a client does, and the reply."""
    import random

    rng = random.Random(seed)
    ids = tokenizer.encode(text, add_special_tokens=False) if tokenizer is not None else list(text)
    content, calls, i = "", {}, 0
    while i < len(ids):
        n = rng.randint(1, 4)
        if tokenizer is not None:
            piece = tokenizer.decode(ids[:i + n])[len(tokenizer.decode(ids[:i])):]
            step = reader.feed(piece, ids[i:i + n], final=i + n >= len(ids))
        else:
            step = reader.feed("".join(ids[i:i + n]), final=i + n >= len(ids))
        i += n
        content += step.content
        for d in step.calls:
            if d.id is not None:
                assert d.index == len(calls) and d.name       # a call opens with its id and name
                calls[d.index] = [d.id, d.name, d.arguments]
            else:
                calls[d.index][2] += d.arguments
    return content, [tuple(c) for c in calls.values()], reader.reply()


STREAMED = [
    ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "n": [1, {"a": "}"}]}}\n'
     '</tool_call>\n<tool_call>{"arguments": {"x": "y\\"z"}, "name": "b"}</tool_call>',
     "Let me check.", [("get_weather", {"city": "Paris", "n": [1, {"a": "}"}]}), ("b", {"x": 'y"z'})]),
    ("It is sunny <tool", "It is sunny <tool", []),                    # a marker that never came
    ("<tool_call>not json</tool_call>", "<tool_call>not json</tool_call>", []),
    ('<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}', None, [("f", {"a": 1})]),   # string args, cut
]


@pytest.mark.parametrize("seed", range(3))
def test_streamed_calls_are_the_reply(seed):
    """However the reply is cut into pieces, the client assembles exactly the calls the reply holds
    (the session logs the reply), names before arguments, and content stops where a call starts."""
    for text, content, calls in STREAMED:
        streamed, assembled, (reply_content, reply_calls) = _stream(HermesCallReader(), text, seed)
        assert reply_content == content and streamed == (content or "")
        assert [(c.id, c.name, c.arguments) for c in reply_calls] == assembled
        assert [(name, json.loads(args)) for _, name, args in assembled] == calls
        whole = HermesToolParser().parse(text)
        assert whole[0] == content and [(c.name, c.arguments) for c in whole[1]] == [a[1:] for a in assembled]
    _, first_only, _ = _stream(HermesCallReader(max_calls=1), STREAMED[0][0], seed)
    assert [c[1] for c in first_only] == ["get_weather"]
    forced = '[{"name":"get_time","parameters":{"zone":"CET"}},{"name":"get_weather","parameters":{"city":"Nice"}}]'
    _, assembled, reply = _stream(ArrayCallReader(), forced, seed)
    assert [(n, a) for _, n, a in assembled] == [("get_time", '{"zone":"CET"}'), ("get_weather", '{"city":"Nice"}')]
    assert reply[0] is None and [c.arguments for c in reply[1]] == ['{"zone":"CET"}', '{"city":"Nice"}']
    _, assembled, _ = _stream(NamedCallReader("get_time"), '{"zone":"UTC"}', seed)
    assert [(n, a) for _, n, a in assembled] == [("get_time", '{"zone":"UTC"}')]


def test_content_is_held_back_only_while_it_may_start_a_call():
    reader = HermesCallReader()
    out = [reader.feed(p).content for p in ["Hello ", "wor", "ld <to", "ol_", 'call>{"name"', ': "f"}']]
    assert "".join(out) == "Hello world" and reader.feed("", final=True).content == ""
    plain = HermesCallReader()
    assert plain.feed("a <to").content == "a" and plain.feed("y").content == " <toy"
    assert plain.feed(" ", final=True).content == " "


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM's streaming hermes parser")
def test_vllm_streaming_parser_gives_the_same_calls(dm_tok, seed):
    from server.engine.vllm_tools import VllmToolParser

    parser = VllmToolParser("hermes", dm_tok[1])
    name_first = STREAMED[0][0].replace('{"arguments": {"x": "y\\"z"}, "name": "b"}', '{"name": "b", "arguments": {"x": "y\\"z"}}')
    assert name_first != STREAMED[0][0]    # vLLM's streaming reader expects the name first
    for text, content, calls in [(name_first, *STREAMED[0][1:]), *STREAMED[1:3]]:
        streamed, assembled, (reply_content, reply_calls) = _stream(parser.reader(), text, seed, dm_tok[1])
        assert [(c.id, c.name, c.arguments) for c in reply_calls] == assembled
        assert [(name, json.loads(args)) for _, name, args in assembled] == calls
        assert streamed.strip() == (content or "") and (reply_content or "").strip() == (content or "")


def test_forced_choices_become_schemas():
    tools = [WEATHER, TIME]
    named = forced_calls_schema(tools, {"type": "function", "function": {"name": "get_time"}})
    assert json.loads(named.schema) == TIME["function"]["parameters"]
    required = json.loads(forced_calls_schema(tools, "required").schema)
    jsonschema.validate([{"name": "get_time", "parameters": {"zone": "UTC"}}], required)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([], required)
    assert forced_calls_schema(tools, "auto") is None
    content, calls = ToolUse("required", HermesToolParser()).read('[{"name": "get_time", "parameters": {"zone": "CET"}}]')
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [("get_time", {"zone": "CET"})]
    assert ToolUse("required", HermesToolParser()).read('[{"na') == ('[{"na', [])   # cut before a name: no call
    one = ToolUse("auto", HermesToolParser(), parallel=False)
    assert len(one.read('<tool_call>{"name": "a"}</tool_call><tool_call>{"name": "b"}</tool_call>')[1]) == 1


# --- HTTP, both engines ----------------------------------------------------------------------------
@pytest.fixture(scope="module", params=ENGINES)
def server(request, tiny_paths, tmp_path_factory):
    settings = make_settings(tiny_paths, tmp_path_factory.mktemp("state"), engine=request.param,
                             chat_template=TOOLS_TEMPLATE)
    kwargs = app_kwargs_for(request, request.param)
    engine = kwargs.get("engine")
    saved = engine.tokenizer.chat_template if engine is not None else None
    if engine is not None:   # the shared vLLM engine: the template for this module only
        engine.tokenizer.chat_template = TOOLS_TEMPLATE
    srv = ThreadServer(settings, **kwargs).start()
    yield srv
    srv.stop()
    if engine is not None:
        engine.tokenizer.chat_template = saved


def test_named_tool_choice(client):
    choice = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, TIME], tool_choice=choice,
                                       max_tokens=40, temperature=0)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content is None
    (call,) = c.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    # streamed: the call opens with its id and name, then its arguments arrive in pieces
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, TIME],
                                                 tool_choice=choice, max_tokens=40, temperature=0, stream=True))
    deltas = [d for ch in chunks if ch.choices for d in (ch.choices[0].delta.tool_calls or [])]
    assert deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather" and len(deltas) > 2
    assert {d.index for d in deltas} == {0} and all(d.id is None and d.function.name is None for d in deltas[1:])
    assert "".join(d.function.arguments or "" for d in deltas) == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)


def test_required_tool_choice(client):
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                       max_tokens=120, temperature=0.7, seed=2, n=2)
    for c in r.choices:
        # the random model may list calls until max_tokens: then the last one is cut short
        assert c.message.tool_calls and c.finish_reason in ("tool_calls", "length"), c
        complete = c.message.tool_calls if c.finish_reason == "tool_calls" else c.message.tool_calls[:-1]
        for call in complete:
            spec = {"get_weather": WEATHER, "get_time": TIME}[call.function.name]
            jsonschema.validate(json.loads(call.function.arguments), spec["function"]["parameters"])
    assert any(c.finish_reason == "tool_calls" for c in r.choices)


def test_tools_are_rendered_and_none_hides_them(http, server):
    tok = server.ctx.engine.tokenizer
    plain = http.post("/tokenize", json={"messages": ASK}).json()["tokens"]   # no tools: plain prompt
    r = http.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER], "max_tokens": 1,
                                                "return_token_ids": True}).json()
    assert '"get_weather"' in tok.decode(r["prompt_token_ids"]) and r["prompt_token_ids"] != plain
    hidden = http.post("/v1/chat/completions", json={"messages": ASK, "tools": [WEATHER], "tool_choice": "none",
                                                     "max_tokens": 1, "return_token_ids": True}).json()
    assert hidden["prompt_token_ids"] == plain and "tool_calls" not in hidden["choices"][0]["message"]


def test_bad_tool_requests_are_400(http):
    named = {"type": "function", "function": {"name": "nope"}}
    for body, param in [({"tools": [WEATHER], "tool_choice": named}, "tool_choice"),
                        ({"tool_choice": "required"}, "tool_choice"),
                        ({"tools": [WEATHER, WEATHER]}, "tools"),
                        ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools.0.function.name"),
                        ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
                         "response_format")]:
        assert_openai_error(http.post("/v1/chat/completions", json={"messages": ASK, **body}), 400, param=param)
    bad_msgs = [{"role": "tool", "content": "22C"}]
    assert_openai_error(http.post("/v1/chat/completions", json={"messages": bad_msgs}), 400,
                        param="messages.0.tool_call_id")


def test_tool_calls_and_results_are_written_once_in_a_session(http, client):
    """Turn 1 calls a tool (named choice); turn 2 resends the whole exchange plus the tool result:
    only the result is new. The reply's tool call comes back as the client sends it."""
    sid = "tools-1"
    choice = {"type": "function", "function": {"name": "get_weather"}}
    first = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], tool_choice=choice,
                                           max_tokens=40, temperature=0, extra_body={"session_id": sid})
    call = first.choices[0].message.tool_calls[0]
    after_first = http.get(f"/v1/sessions/{sid}").json()
    assistant = {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]}
    result = {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}
    second = client.chat.completions.create(model="tiny", messages=ASK + [assistant, result], tools=[WEATHER],
                                            max_tokens=4, temperature=0,
                                            extra_body={"session_id": sid, "return_token_ids": True})
    memory = second.model_extra["delta_mem"]
    assert memory["committed"] and memory["context_tokens"] > 0
    tok = http.post("/tokenize", json={"messages": ASK + [assistant]}).json()   # without tools: a lower bound
    assert memory["context_tokens"] > tok["count"]
    prompt = second.model_extra["prompt_token_ids"]
    new_text = tok_decode(http, prompt[memory["context_tokens"] + memory["pending_tokens"]:])
    assert new_text.startswith("<|im_start|>user\n<tool_response>") and "get_weather" not in new_text
    after = http.get(f"/v1/sessions/{sid}").json()
    assert after["version"] == after_first["version"] + 1


def test_memory_mode_tool_turns_write_the_tool_list_once(http, client):
    """A client that sends only the new message (memory mode) still sends the tools; the template
    renders them ahead of it each time, but only the first turn writes them."""
    sid = "tools-2"
    choice = {"type": "function", "function": {"name": "get_weather"}}
    first = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], tool_choice=choice,
                                           max_tokens=40, temperature=0,
                                           extra_body={"session_id": sid, "return_token_ids": True})
    assert first.model_extra["delta_mem"]["context_tokens"] == 0       # the tool list was new: written
    call = first.choices[0].message.tool_calls[0]
    result = {"role": "tool", "tool_call_id": call.id, "content": '{"temp": 21}'}
    second = client.chat.completions.create(model="tiny", messages=[result], tools=[WEATHER], max_tokens=3,
                                            temperature=0, extra_body={"session_id": sid, "return_token_ids": True})
    memory = second.model_extra["delta_mem"]
    prompt = second.model_extra["prompt_token_ids"]
    context = tok_decode(http, prompt[:memory["context_tokens"]])
    new = tok_decode(http, prompt[memory["context_tokens"] + memory["pending_tokens"]:])
    assert '"get_weather"' in context and context.endswith("<|im_end|>\n")
    assert new.startswith("<|im_start|>user\n<tool_response>") and "get_weather" not in new


def tok_decode(http: httpx.Client, ids: list[int]) -> str:
    return http.post("/detokenize", json={"tokens": ids}).json()["prompt"]


# --- auto: the embedded engine with its token choice scripted ------------------------------------------
@pytest.fixture(scope="module")
def scripted(tiny_paths, tmp_path_factory):
    from server.engine.torch_engine import TorchEngine

    class ScriptedEngine(TorchEngine):
        """Samples `script` token by token (then EOS) instead of what the random model prefers."""

        script: list[int] = []

        def _on_logits(self, act, logits):
            i = len(act.generated)
            target = self.script[i] if i < len(self.script) else self.eos_token_ids[0]
            forced = torch.full_like(logits, -1e4)
            forced[target] = 0.0
            return super()._on_logits(act, forced)

    settings = make_settings(tiny_paths, tmp_path_factory.mktemp("state"), chat_template=TOOLS_TEMPLATE)
    engine = ScriptedEngine.from_settings(settings)
    srv = ThreadServer(settings, engine=engine).start()
    yield srv, engine
    srv.stop()
    import asyncio
    asyncio.run(engine.stop())


def test_auto_tool_calls_are_read_from_the_reply(scripted):
    srv, engine = scripted
    reply = 'Checking.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Nice", "unit": "C"}}\n</tool_call>'
    engine.script = engine.tokenizer.encode(reply, add_special_tokens=False)
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, TIME], max_tokens=100)
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content == "Checking."
    assert [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls] == [
        ("get_weather", {"city": "Nice", "unit": "C"})]
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, TIME], max_tokens=100,
                                                 stream=True))
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    calls = [d for ch in chunks if ch.choices for d in (ch.choices[0].delta.tool_calls or [])]
    assert content == "Checking." and [d.function.name for d in calls if d.id] == ["get_weather"]
    assert json.loads("".join(d.function.arguments or "" for d in calls)) == {"city": "Nice", "unit": "C"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # no call in the reply: plain content, finish_reason stop, nothing held back
    engine.script = engine.tokenizer.encode("It is sunny <tool", add_special_tokens=False)
    plain = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], max_tokens=100, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in plain if ch.choices) == "It is sunny <tool"
    # parallel_tool_calls=false keeps the first call
    engine.script = engine.tokenizer.encode(
        '<tool_call>{"name": "get_time", "arguments": {"zone": "UTC"}}</tool_call>'
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Lyon", "unit": "F"}}</tool_call>',
        add_special_tokens=False)
    both = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, TIME], max_tokens=200)
    one = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER, TIME], max_tokens=200,
                                         parallel_tool_calls=False)
    assert len(both.choices[0].message.tool_calls) == 2 and len(one.choices[0].message.tool_calls) == 1


def test_a_resent_tool_call_renders_with_arguments_as_a_mapping():
    """The assistant tool call goes to the template with its arguments as a mapping (as HF templates
    expect), so a resent call renders exactly as the template renders the model's own call."""
    from server.prompt import ChatMessage, render
    from delta_mem_vllm.testing.tiny import build_tokenizer

    tok = build_tokenizer()
    tok.chat_template = TOOLS_TEMPLATE
    call = ToolCall("call_1", "get_weather", '{"city": "Paris", "unit": "C"}')
    ids = render(tok, [ChatMessage("user", "hi"), ChatMessage("assistant", "", (call,))], False, tools=[WEATHER])
    text = tok.decode(ids)
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "C"}}\n</tool_call>' in text


def test_a_streamed_call_sent_back_is_recognised_as_written(scripted):
    """The client assembles the streamed call; sent back with its result, it is context (written
    once), because the session logged exactly what was streamed."""
    srv, engine = scripted
    reply = 'On it.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lyon", "unit": "F"}}\n</tool_call>'
    engine.script = engine.tokenizer.encode(reply, add_special_tokens=False)
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER], max_tokens=100,
                                                 stream=True, extra_body={"session_id": "streamed-call"}))
    content = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    deltas = [d for ch in chunks if ch.choices for d in (ch.choices[0].delta.tool_calls or [])]
    call = {"id": deltas[0].id, "type": "function",
            "function": {"name": deltas[0].function.name, "arguments": "".join(d.function.arguments or "" for d in deltas)}}
    assert content.strip() == "On it." and json.loads(call["function"]["arguments"]) == {"city": "Lyon", "unit": "F"}
    engine.script = engine.tokenizer.encode("Fine.", add_special_tokens=False)
    sent = ASK + [{"role": "assistant", "content": content, "tool_calls": [call]},
                  {"role": "tool", "tool_call_id": call["id"], "content": "15F"}]
    r = httpx.post(f"{srv.url}/v1/chat/completions", json={"messages": sent, "tools": [WEATHER], "max_tokens": 5,
                                                            "session_id": "streamed-call", "return_token_ids": True},
                   timeout=60).json()
    memory = r["delta_mem"]
    new = engine.tokenizer.decode(r["prompt_token_ids"][memory["context_tokens"] + memory["pending_tokens"]:])
    assert new.startswith("<|im_start|>user\n<tool_response>") and "get_weather" not in new
