"""What agents send beyond plain chat: every OpenAI request field is honoured or refused by name,
vLLM's sampling extras, logprobs, /tokenize and /detokenize, --chat-template. Both engines, through
the official `openai` client against a real uvicorn server."""

from __future__ import annotations

import json
import math
import typing

import httpx
import openai
import pytest
from openai.types import completion_create_params as completion_params
from openai.types.chat import completion_create_params as chat_params

from tests.server.conftest import (ThreadServer, app_kwargs_for, assert_openai_error, make_settings,
                                   requires_vllm)

MSGS = [{"role": "user", "content": "Say something about the sea."}]

# Every field the official client can send, with a value that asks for something. Fields in
# HONOURED must then answer 200; every other one a 400 naming it. A field a newer `openai`
# adds fails test_the_field_table_covers_the_client until it is decided here.
CHAT_FIELDS: dict[str, typing.Any] = {
    "messages": MSGS, "model": "tiny", "max_tokens": 2, "max_completion_tokens": 2, "temperature": 0.5,
    "top_p": 0.9, "seed": 7, "stop": ["\n\n"], "n": 2, "stream_options": None, "logit_bias": {"5": 1.0},
    "frequency_penalty": 0.5, "presence_penalty": 0.5, "logprobs": True, "top_logprobs": 2, "user": "u-1",
    "safety_identifier": "s-1", "prompt_cache_key": "k", "prompt_cache_retention": "24h",
    "prompt_cache_options": {"mode": "implicit", "ttl": "30m"}, "service_tier": "auto",
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
    "tool_choice": "auto", "parallel_tool_calls": True, "response_format": {"type": "json_object"},
    # not implemented
    "functions": [{"name": "f"}], "function_call": "auto", "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"], "prediction": {"type": "content", "content": "x"}, "web_search_options": {},
    "reasoning_effort": "low", "verbosity": "low", "store": True, "metadata": {"a": "b"},
    "moderation": {"model": "omni-moderation-latest"},
}
CHAT_HONOURED = {"messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "seed", "stop",
                 "n", "stream_options", "logit_bias", "frequency_penalty", "presence_penalty", "logprobs",
                 "top_logprobs", "user", "safety_identifier", "prompt_cache_key", "prompt_cache_retention",
                 "prompt_cache_options", "service_tier", "response_format", "tools", "tool_choice",
                 "parallel_tool_calls"}
COMPLETION_FIELDS: dict[str, typing.Any] = {
    "prompt": "The sea", "model": "tiny", "max_tokens": 2, "temperature": 0.5, "top_p": 0.9, "seed": 7,
    "stop": ["\n\n"], "n": 2, "stream_options": None, "logit_bias": {"5": 1.0}, "frequency_penalty": 0.5,
    "presence_penalty": 0.5, "logprobs": 2, "user": "u-1",
    "best_of": 2, "echo": True, "suffix": "tail",
}
COMPLETION_HONOURED = {"prompt", "model", "max_tokens", "temperature", "top_p", "seed", "stop", "n",
                       "stream_options", "logit_bias", "frequency_penalty", "presence_penalty", "logprobs", "user"}


def _client_fields(params: type) -> set[str]:
    return set(typing.get_type_hints(params))


def test_the_field_table_covers_the_client():
    assert _client_fields(chat_params.CompletionCreateParamsBase) == set(CHAT_FIELDS)
    assert _client_fields(completion_params.CompletionCreateParamsBase) == set(COMPLETION_FIELDS)


@pytest.mark.parametrize("kind", ["chat", "completion"])
def test_every_client_field_is_honoured_or_refused_by_name(kind, http):
    fields, honoured, required = ((CHAT_FIELDS, CHAT_HONOURED, ("messages",)) if kind == "chat"
                                  else (COMPLETION_FIELDS, COMPLETION_HONOURED, ("prompt",)))
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    refused = []
    for name, value in fields.items():
        body = {key: fields[key] for key in required} | {"model": "tiny", "max_tokens": 2, name: value}
        if name == "top_logprobs":
            body["logprobs"] = True
        r = http.post(path, json=body)
        if name in honoured:
            assert r.status_code == 200, (name, r.text)
        else:
            err = assert_openai_error(r, 400, param=name)
            assert name in err["message"], err
            refused.append(name)
    assert set(refused) == set(fields) - honoured


def test_unknown_fields_and_unimplemented_vllm_extras_are_refused(http):
    for name, value in [("temprature", 0.5), ("include_stop_str_in_output", True), ("guided_json", {}),
                        ("use_beam_search", True)]:
        r = http.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 2, name: value})
        err = assert_openai_error(r, 400, code="unsupported_parameter", param=name)
        assert name in err["message"]
    # a default value of a field we do not implement asks for nothing: accepted
    r = http.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 2, "tools": [], "store": False,
                                                "tool_choice": "none", "modalities": ["text"]})
    assert r.status_code == 200, r.text
    # message fields too: an assistant message's audio or refusal is not silently dropped
    for name, value in [("audio", {"id": "a1"}), ("refusal", "no"), ("function_call", {"name": "f", "arguments": "{}"})]:
        msgs = [{"role": "assistant", "content": "x", name: value}, {"role": "user", "content": "hi"}]
        assert_openai_error(http.post("/v1/chat/completions", json={"messages": msgs}), 400, param=f"messages.0.{name}")


def test_invalid_values_name_their_field(http):
    for body, param in [({"top_logprobs": 3}, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
                        ({"top_k": -2}, "top_k"), ({"min_p": 1.5}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty"),
                        ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"), ({"service_tier": "flex"}, "service_tier"),
                        ({"temperature": "NaN"}, "temperature")]:
        r = http.post("/v1/chat/completions", json={"messages": MSGS, **body})
        assert_openai_error(r, 400, param=param)


# --- structured outputs -------------------------------------------------------------------------
SCHEMA = {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"},
                                           "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
          "required": ["color", "ok", "tags"], "additionalProperties": False}
JSON_SCHEMA_FORMAT = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}


def test_json_schema_replies_validate(client):
    import jsonschema

    for stream in (False, True):
        kw = dict(model="tiny", messages=MSGS, max_tokens=80, temperature=0.8, seed=4, response_format=JSON_SCHEMA_FORMAT)
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                           if c.choices)
        else:
            reply = client.chat.completions.create(**kw)
            assert reply.choices[0].finish_reason == "stop"
            text = reply.choices[0].message.content
        jsonschema.validate(json.loads(text), SCHEMA)
        assert " " not in text   # compact JSON
    # several seeds: every draw validates
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=80, temperature=1.0, seed=9, n=3,
                                       response_format=JSON_SCHEMA_FORMAT)
    for choice in r.choices:
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_json_object_replies_parse(client):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=200, temperature=0,
                                       response_format={"type": "json_object"})
    assert r.choices[0].finish_reason == "stop", r.choices[0].message.content
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_bad_response_formats_are_400(http):
    for fmt, param in [({"type": "json_schema"}, "response_format.json_schema"),
                       ({"type": "yaml"}, "response_format.type"),
                       ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}},
                        "response_format.json_schema.name"),
                       ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}},
                        "response_format")]:
        r = http.post("/v1/chat/completions", json={"messages": MSGS, "max_tokens": 4, "response_format": fmt})
        assert_openai_error(r, 400, param=param)


# --- logprobs -------------------------------------------------------------------------------------
def test_chat_logprobs_stream_and_non_stream(client):
    kw = dict(model="tiny", messages=MSGS, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
              extra_body={"ignore_eos": True, "return_token_ids": True})
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    ids = r.choices[0].model_extra["token_ids"]
    assert len(content) == len(ids) == 6
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        tops = [t.logprob for t in entry.top_logprobs]
        assert tops == sorted(tops, reverse=True)
        # greedy: the chosen token is the most likely one
        assert entry.token == entry.top_logprobs[0].token and math.isclose(entry.logprob, tops[0], abs_tol=1e-6)
        assert bytes(entry.bytes) == entry.token.encode()
    streamed = [c for chunk in client.chat.completions.create(stream=True, **kw)
                for c in (chunk.choices[0].logprobs.content if chunk.choices and chunk.choices[0].logprobs else [])]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [(e.token, round(e.logprob, 5)) for e in content]
    # without logprobs: none reported
    plain = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs(client):
    r = client.completions.create(model="tiny", prompt="The sea", max_tokens=5, temperature=0, logprobs=2,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert lp.text_offset[0] == 0 and all(b >= a for a, b in zip(lp.text_offset, lp.text_offset[1:]))
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert len(top) == 2 and math.isclose(max(top.values()), logprob, abs_tol=1e-6) and token in top


# --- sampling extras ------------------------------------------------------------------------------
def _ids(client, **extra) -> list[int]:
    r = client.completions.create(model="tiny", prompt="the the the", max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True, "return_token_ids": True, **extra})
    return r.choices[0].model_extra["token_ids"]


def test_penalties_change_greedy_output(client):
    plain = _ids(client)
    assert _ids(client, repetition_penalty=1.0) == plain
    for extra in ({"repetition_penalty": 3.0}, {"frequency_penalty": 2.0}, {"presence_penalty": 2.0}):
        out = _ids(client, **extra)
        assert out != plain, extra
        assert len(set(out)) >= len(set(plain)), extra   # penalising repeats never makes fewer distinct tokens


def test_top_k_one_and_min_p_one_are_greedy(client):
    greedy = _ids(client)
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        r = client.completions.create(model="tiny", prompt="the the the", max_tokens=12, temperature=1.5, seed=3,
                                      extra_body={"ignore_eos": True, "return_token_ids": True, **extra})
        assert r.choices[0].model_extra["token_ids"] == greedy, extra


def test_min_tokens_holds_back_the_end_of_sequence(client, server):
    eos = server.ctx.engine.eos_token_ids[0]
    push_eos = {"logit_bias": {str(eos): 100}}
    r = client.completions.create(model="tiny", prompt="The sea", max_tokens=10, temperature=0, extra_body=push_eos)
    assert r.usage.completion_tokens == 1 and r.choices[0].finish_reason == "stop"
    r = client.completions.create(model="tiny", prompt="The sea", max_tokens=10, temperature=0,
                                  extra_body={**push_eos, "min_tokens": 4, "return_token_ids": True})
    ids = r.choices[0].model_extra["token_ids"]
    assert r.usage.completion_tokens == 5 and eos not in ids[:4] and r.choices[0].finish_reason == "stop"


def test_seeded_sampling_does_not_depend_on_prompt_chunking(server):
    """On vLLM (32 tokens per step here) a prompt is chunked differently alone and behind another
    request; the discarded draws of partial prefills must not shift a seeded request's samples."""
    import asyncio

    # 64 prompt tokens: alone two 32-token chunks; behind a neighbour whose last prefill chunk leaves
    # 16 tokens of the step's budget (336 = 10 × 32 + 16), three chunks
    seeded = dict(model="tiny", prompt=[3 + i % 150 for i in range(64)], max_tokens=8, temperature=1.0, seed=11,
                  extra_body={"ignore_eos": True, "return_token_ids": True})

    async def run(with_neighbour: bool) -> list[int]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        try:
            jobs = []
            if with_neighbour:
                jobs.append(asyncio.ensure_future(client.completions.create(
                    model="tiny", prompt=[5 + i % 140 for i in range(336)], max_tokens=4,
                    extra_body={"ignore_eos": True})))
                await asyncio.sleep(0.05)
            jobs.append(asyncio.ensure_future(client.completions.create(**seeded)))
            return (await asyncio.gather(*jobs))[-1].choices[0].model_extra["token_ids"]
        finally:
            await client.close()

    alone = asyncio.run(run(False))
    assert asyncio.run(run(True)) == alone
    assert asyncio.run(run(False)) == alone


# --- n choices ------------------------------------------------------------------------------------
def test_n_choices_for_stateless_and_read_only_requests(client, http):
    kw = dict(model="tiny", messages=MSGS, max_tokens=6, temperature=1.0, seed=5)
    r = client.chat.completions.create(n=3, extra_body={"ignore_eos": True, "return_token_ids": True}, **kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    ids = [c.model_extra["token_ids"] for c in r.choices]
    assert r.usage.completion_tokens == 18 and len({tuple(i) for i in ids}) > 1   # independent draws
    again = client.chat.completions.create(n=3, extra_body={"ignore_eos": True, "return_token_ids": True}, **kw)
    assert [c.model_extra["token_ids"] for c in again.choices] == ids             # seeded: reproducible
    one = client.chat.completions.create(extra_body={"ignore_eos": True, "return_token_ids": True}, **kw)
    assert one.choices[0].model_extra["token_ids"] == ids[0]                      # choice 0 keeps the seed
    streamed: dict[int, str] = {}
    finishes = {}
    for chunk in client.chat.completions.create(n=3, stream=True, extra_body={"ignore_eos": True}, **kw):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason:
                finishes[c.index] = c.finish_reason
    assert streamed == {c.index: c.message.content for c in r.choices} and finishes == {0: "length", 1: "length",
                                                                                           2: "length"}
    # a session turn that writes cannot branch; a read-only one can, and changes nothing
    client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=2, extra_body={"session_id": "n-s"})
    before = http.get("/v1/sessions/n-s").json()
    r = http.post("/v1/chat/completions", json={"messages": MSGS, "n": 2, "session_id": "n-s"})
    assert_openai_error(r, 400, param="n")
    r = http.post("/v1/chat/completions", json={"messages": MSGS, "n": 2, "max_tokens": 3, "session_id": "n-s",
                                                "delta_mem": {"write": False}})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2
    after = http.get("/v1/sessions/n-s").json()
    assert (after["version"], after["tokens_written"]) == (before["version"], before["tokens_written"])
    completions = client.completions.create(model="tiny", prompt="The sea", n=2, max_tokens=3, seed=1)
    assert [c.index for c in completions.choices] == [0, 1]


# --- /tokenize, /detokenize -----------------------------------------------------------------------
def test_tokenize_matches_what_the_server_runs(http, client, server):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=1,
                                       extra_body={"return_token_ids": True})
    t = http.post("/tokenize", json={"model": "tiny", "messages": MSGS}).json()
    assert t["tokens"] == r.model_extra["prompt_token_ids"] and t["count"] == len(t["tokens"])
    assert t["max_model_len"] == server.ctx.engine.max_model_len
    text = http.post("/tokenize", json={"prompt": "The sea", "return_token_strs": True}).json()
    c = client.completions.create(model="tiny", prompt="The sea", max_tokens=1, extra_body={"return_token_ids": True})
    assert text["tokens"] == c.model_extra["prompt_token_ids"] and len(text["token_strs"]) == text["count"]
    back = http.post("/detokenize", json={"tokens": text["tokens"]}).json()
    assert back["prompt"].endswith("The sea")
    assert_openai_error(http.post("/tokenize", json={}), 400, param="prompt")
    assert_openai_error(http.post("/detokenize", json={"tokens": [10**9]}), 400, param="tokens")
    assert_openai_error(http.post("/tokenize", json={"prompt": "x", "model": "other"}), 404, param="model")


def test_chat_template_flag(tiny_paths, tmp_path):
    from pydantic import ValidationError

    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    (tmp_path / "t.jinja").write_text(template)
    srv = ThreadServer(make_settings(tiny_paths, tmp_path / "state", chat_template=str(tmp_path / "t.jinja"))).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as http:
            ids = http.post("/tokenize", json={"messages": MSGS}).json()["tokens"]
            expected = srv.ctx.engine.tokenizer.encode("<user>Say something about the sea.>", add_special_tokens=False)
            assert ids == expected
    finally:
        srv.stop()
    with pytest.raises(ValidationError, match="neither a file nor a Jinja template"):
        make_settings(tiny_paths, tmp_path / "state", chat_template=str(tmp_path / "missing.jinja"))


# --- both engines, same answers -------------------------------------------------------------------
@requires_vllm
def test_engines_agree_on_sampling_extras_and_logprobs(request, tiny_paths, tmp_path):
    cases = [{}, {"repetition_penalty": 2.0}, {"frequency_penalty": 1.5, "presence_penalty": 0.5},
             {"min_tokens": 3, "logit_bias": {"2": 50}}, {"response_format": JSON_SCHEMA_FORMAT, "max_tokens": 40}]
    results = {}
    for engine in ("torch", "vllm"):
        srv = ThreadServer(make_settings(tiny_paths, tmp_path / engine, engine=engine),
                           **app_kwargs_for(request, engine)).start()
        try:
            client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
            results[engine] = []
            for extra in cases:
                extra = {"max_tokens": 8, **extra}
                r = client.chat.completions.create(model="tiny", messages=MSGS, temperature=0, logprobs=True,
                                                   top_logprobs=2, extra_body={"return_token_ids": True, **extra})
                choice = r.choices[0]
                results[engine].append((choice.model_extra["token_ids"],
                                        [(e.logprob, [t.token for t in e.top_logprobs]) for e in choice.logprobs.content]))
        finally:
            srv.stop()
    for (ids_t, lp_t), (ids_v, lp_v) in zip(results["torch"], results["vllm"]):
        assert ids_v == ids_t
        for (a, tops_a), (b, tops_b) in zip(lp_t, lp_v):
            assert math.isclose(a, b, abs_tol=1e-4) and tops_a == tops_b


# --- large requests ---------------------------------------------------------------------------------
def test_a_huge_prompt_is_refused_without_freezing_the_server(server):
    """20 MB of text cannot fit the context: refused before tokenising, and /health answers meanwhile."""
    import threading
    import time

    huge = {"model": "tiny", "messages": [{"role": "user", "content": "lorem ipsum dolor " * 1_150_000}]}
    result: dict = {}

    def send() -> None:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            t0 = time.perf_counter()
            result["response"] = c.post("/v1/chat/completions", json=huge)
            result["seconds"] = time.perf_counter() - t0

    sender = threading.Thread(target=send)
    sender.start()
    health = []
    with httpx.Client(base_url=server.url, timeout=30) as c:
        while sender.is_alive():
            t0 = time.perf_counter()
            assert c.get("/health").status_code == 200
            health.append(time.perf_counter() - t0)
            time.sleep(0.02)
    sender.join()
    err = assert_openai_error(result["response"], 400, "context_length_exceeded", param="messages")
    assert "at least" in err["message"]
    # tokenising 20 MB takes tens of seconds here; the refusal and every health check are far quicker
    assert result["seconds"] < 10 and max(health, default=0) < 5, (result["seconds"], max(health, default=0))
    r = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "x" * 20_000_000}, timeout=120)
    assert_openai_error(r, 400, "context_length_exceeded", param="prompt")
