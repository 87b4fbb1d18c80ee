"""The Responses API through the official `openai` client on both engines: a conversation that
continues from `previous_response_id` through the session memory (and ends with exactly the state of
the same conversation in chat memory mode), streaming events, stored responses (GET, DELETE,
input_items), tools and structured outputs, and every client field honoured or refused by name."""

from __future__ import annotations

import json
import typing

import httpx
import jsonschema
import openai
import pytest
import torch
from openai.types.responses import response_create_params as params

from delta_mem_vllm.state import FilesystemBackend
from tests.server.conftest import ThreadServer, assert_openai_error, export_state, make_settings

MAX = 6
# `n` is bounded: an unbounded integer lets a sampled random model run its digits past the token limit
SCHEMA = {"type": "object", "properties": {"city": {"enum": ["Paris", "Lyon"]},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 999}},
          "required": ["city", "n"], "additionalProperties": False}
WEATHER = {"type": "function", "name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Lyon"]}},
                          "required": ["city"], "additionalProperties": False}}


def test_a_chain_continues_through_the_session_memory(client, http):
    """Three responses chained by previous_response_id send only their new input, and leave exactly
    the state that the same three turns leave in a chat memory-mode session."""
    turns = ["My name is Ada and I live in Lyon.", "I have two cats.", "Where do I live?"]
    first = client.responses.create(model="tiny", input=turns[0], instructions="Be brief.", temperature=0,
                                    max_output_tokens=MAX)
    assert first.status in ("completed", "incomplete") and first.output[0].type == "message"
    assert first.previous_response_id is None and first.usage.input_tokens > 0
    chain = [first]
    for text in turns[1:]:
        chain.append(client.responses.create(model="tiny", input=text, instructions="Be brief.", temperature=0,
                                             max_output_tokens=MAX, previous_response_id=chain[-1].id))
    memory = [r.model_extra["delta_mem"] for r in chain]
    assert {m["session_id"] for m in memory} == {first.id} and all(m["committed"] for m in memory)
    assert [m["version"] for m in memory] == [1, 2, 3]
    assert chain[2].previous_response_id == chain[1].id
    # the later turns' prompts hold the new message only (the instructions are context, not resent memory)
    tokenized = http.post("/tokenize", json={"messages": [{"role": "system", "content": "Be brief."},
                                                          {"role": "user", "content": turns[2]}]}).json()
    assert chain[2].usage.input_tokens == tokenized["count"] + memory[2]["pending_tokens"]

    # the same conversation in chat memory mode: same prompts, same replies, same state
    sid = "responses-reference"
    for i, text in enumerate(turns):
        r = http.post("/v1/chat/completions", json={
            "model": "tiny", "session_id": sid, "temperature": 0, "max_tokens": MAX,
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]}).json()
        assert r["choices"][0]["message"]["content"] == chain[i].output_text
    assert torch.equal(export_state(http, sid), export_state(http, first.id))

    # stored: GET returns what the POST returned
    got = http.get(f"/v1/responses/{chain[1].id}").json()
    assert got["output"] == chain[1].model_dump(exclude_none=True)["output"] and got["previous_response_id"] == first.id
    assert got["delta_mem"] == memory[1] and got["usage"] == chain[1].model_dump(exclude_none=True)["usage"]
    # the memory is linear: an older response cannot be continued
    r = http.post("/v1/responses", json={"input": "again", "previous_response_id": chain[1].id, "max_output_tokens": 2})
    assert_openai_error(r, 409, "response_not_latest", param="previous_response_id")
    # a turn from another route moves the session on too
    http.post("/v1/chat/completions", json={"session_id": first.id, "max_tokens": 2,
                                            "messages": [{"role": "user", "content": "hi"}]})
    r = http.post("/v1/responses", json={"input": "x", "previous_response_id": chain[2].id, "max_output_tokens": 2})
    assert_openai_error(r, 409, "response_not_latest")
    assert http.get(f"/v1/sessions/{first.id}").json()["version"] == 4


def test_stored_responses_input_items_delete_and_store_false(client, http):
    r = client.responses.create(model="tiny", input=[{"role": "user", "content": "one"},
                                                     {"role": "user", "content": [{"type": "input_text", "text": "two"}]}],
                                max_output_tokens=2, metadata={"k": "v"})
    assert client.responses.retrieve(r.id).metadata == {"k": "v"}
    items = client.responses.input_items.list(r.id, order="asc")
    assert [i.content[0].text if i.content and not isinstance(i.content, str) else i.content for i in items.data] \
        == ["one", "two"] or len(items.data) == 2
    deleted = http.delete(f"/v1/responses/{r.id}").json()
    assert deleted == {"id": r.id, "object": "response.deleted", "deleted": True}
    assert_openai_error(http.get(f"/v1/responses/{r.id}"), 404, "response_not_found")
    # store=false: nothing kept, no session made
    off = client.responses.create(model="tiny", input="hello", max_output_tokens=2, store=False)
    assert off.model_extra["delta_mem"]["session_id"] is None
    assert_openai_error(http.get(f"/v1/responses/{off.id}"), 404, "response_not_found")
    assert http.get(f"/v1/sessions/{off.id}").status_code == 404
    # deleting the session takes its responses with it
    kept = client.responses.create(model="tiny", input="hello", max_output_tokens=2)
    assert http.delete(f"/v1/sessions/{kept.id}").status_code in (200, 204)
    assert_openai_error(http.get(f"/v1/responses/{kept.id}"), 404, "response_not_found")
    r = http.post("/v1/responses", json={"input": "x", "previous_response_id": kept.id})
    assert_openai_error(r, 404, "response_not_found", param="previous_response_id")


def test_streamed_events_end_with_the_stored_response(client, http):
    first = client.responses.create(model="tiny", input="Remember: the code is 42.", max_output_tokens=MAX,
                                    temperature=0)
    stream = client.responses.create(model="tiny", input="What is the code?", max_output_tokens=MAX,
                                     temperature=0, previous_response_id=first.id, stream=True)
    events = list(stream)
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          kinds[-1]] and kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert final.output_text == text and final.previous_response_id == first.id
    assert http.get(f"/v1/responses/{final.id}").json()["output"] == final.model_dump(exclude_none=True)["output"]
    # the SDK's stream helper accumulates the events (it raises on any it cannot place)
    with client.responses.stream(model="tiny", input="And again?", max_output_tokens=MAX, temperature=0,
                                 previous_response_id=final.id) as helper:
        seen = list(helper)
    done = seen[-1].response
    assert done.previous_response_id == final.id and done.output_text == client.responses.retrieve(done.id).output_text
    assert "".join(e.delta for e in seen if e.type == "response.output_text.delta") == done.output_text


def test_function_calls_and_their_outputs(client, http):
    choice = {"type": "function", "name": "get_weather"}
    r = client.responses.create(model="tiny", input="Weather in Paris?", tools=[WEATHER], tool_choice=choice,
                                max_output_tokens=40, temperature=0)
    (call,) = r.output
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    # streamed: the call's arguments come as deltas that add up to the stored item
    events = list(client.responses.create(model="tiny", input="Weather in Paris?", tools=[WEATHER], tool_choice=choice,
                                          max_output_tokens=40, temperature=0, stream=True))
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert len(deltas) > 1 and "".join(deltas) == done.arguments == call.arguments
    # the tool's output continues the chain
    after = client.responses.create(model="tiny", previous_response_id=r.id, tools=[WEATHER], max_output_tokens=3,
                                    input=[{"type": "function_call_output", "call_id": call.call_id,
                                            "output": '{"temp": 21}'}], temperature=0)
    memory = after.model_extra["delta_mem"]
    assert memory["session_id"] == r.id and memory["committed"] and memory["version"] == 2


def test_json_schema_text_format(client):
    fmt = {"format": {"type": "json_schema", "name": "answer", "schema": SCHEMA, "strict": True}}
    r = client.responses.create(model="tiny", input="Give me a city.", text=fmt, max_output_tokens=60,
                                temperature=0.8, store=False)
    jsonschema.validate(json.loads(r.output_text), SCHEMA)
    assert r.text.format.type == "json_schema"


def test_logprobs_when_included(http):
    r = http.post("/v1/responses", json={"input": "hi", "max_output_tokens": 3, "store": False, "top_logprobs": 2,
                                         "include": ["message.output_text.logprobs"]}).json()
    part = r["output"][0]["content"][0]
    assert len(part["logprobs"]) == r["usage"]["output_tokens"]
    assert all(len(e["top_logprobs"]) == 2 and e["logprob"] <= 0 for e in part["logprobs"])


def test_bad_requests_name_their_field(http):
    before = len(http.get("/v1/sessions", params={"limit": 1000}).json()["data"])
    r = http.post("/v1/responses", json={"input": "x", "max_output_tokens": 10**6})
    assert_openai_error(r, 400, "context_length_exceeded")
    assert len(http.get("/v1/sessions", params={"limit": 1000}).json()["data"]) == before   # no empty chain left
    for body, param in [
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
         "input.0.content.0.type"),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input.0.type"),
        ({"input": "x", "tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"input": "x", "tool_choice": "required"}, "tool_choice"),
        ({"input": "x", "previous_response_id": "resp_nope"}, "previous_response_id"),
        ({"input": "x", "include": ["reasoning.encrypted_content"]}, "include"),
        ({"input": [{"role": "robot", "content": "x"}]}, "input.0.role"),
        ({"input": []}, "input"),
        ({"input": [{"role": "user", "content": "x", "cache": True}]}, "input.0.cache"),
        ({"input": "x", "text": {"format": {"type": "json_schema", "name": "bad name", "schema": {}}}}, "text.format"),
    ]:
        r = http.post("/v1/responses", json=body)
        assert r.status_code in (400, 404), (body, r.text)
        err = r.json()["error"]
        assert err["param"] is not None and err["param"].startswith(param), (body, err)


# Every field the official client can send for POST /v1/responses, with a value that asks for something.
RESPONSE_FIELDS: dict[str, typing.Any] = {
    "input": "hi", "model": "tiny", "instructions": "Be brief.", "max_output_tokens": 2, "metadata": {"a": "b"},
    "parallel_tool_calls": False, "previous_response_id": None, "prompt_cache_key": "k",
    "prompt_cache_retention": "24h", "prompt_cache_options": {"mode": "implicit"}, "safety_identifier": "s",
    "service_tier": "auto", "store": False, "stream_options": {"include_obfuscation": False},
    "temperature": 0.5, "text": {"format": {"type": "json_object"}}, "tool_choice": "auto",
    "tools": [WEATHER], "top_logprobs": 2, "top_p": 0.9, "truncation": "disabled", "user": "u",
    "include": ["message.output_text.logprobs"],
    # not implemented
    "background": True, "background_options": {"mode": "x"}, "conversation": "conv_1", "prompt": {"id": "p"},
    "max_tool_calls": 3, "context_management": [{"type": "compaction"}], "access_programs": {"a": 1},
    "image": {"size": "auto"}, "moderation": {"model": "m"}, "reasoning": {"effort": "low"},
}
RESPONSE_REFUSED = {"background", "background_options", "conversation", "prompt", "max_tool_calls",
                    "context_management", "access_programs", "image", "moderation", "reasoning"}


def test_every_client_field_is_honoured_or_refused_by_name(http):
    assert set(typing.get_type_hints(params.ResponseCreateParamsBase)) == set(RESPONSE_FIELDS)
    for name, value in RESPONSE_FIELDS.items():
        body = {"input": "hi", "max_output_tokens": 2, "store": False, name: value}
        r = http.post("/v1/responses", json=body)
        if name in RESPONSE_REFUSED:
            err = assert_openai_error(r, 400, param=name)
            assert name in err["message"], err
        else:
            assert r.status_code == 200, (name, r.text)
    assert_openai_error(http.post("/v1/responses", json={"input": "x", "truncation": "auto"}), 400, param="truncation")


def test_the_openai_client_raises_for_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_does_not_exist")


class _FailsAfterCommitPoint(FilesystemBackend):
    """A real filesystem backend whose directory fsync after the manifest's rename fails (the new
    manifest is in place: the commit landed); with `blind`, reading the outcome back fails too."""
    armed = blind = False

    def _write(self, d, name, payload):
        super()._write(d, name, payload)
        if self.armed and name == "manifest.json":
            raise OSError(5, "Input/output error")

    def revision(self, key):
        if self.armed and self.blind:
            raise OSError(5, "Input/output error")
        return super().revision(key)


def test_a_commit_that_landed_is_answered_as_committed_and_the_chain_goes_on(tiny_paths, tmp_path):
    """The store fails after the commit point: the turn is answered 200 (its outcome read back), or,
    when even that read fails, 503 `commit_unknown` with the stored response kept, so the chain
    continues from it once the store is back, never 409 on a response that is 404."""
    backend = _FailsAfterCommitPoint(tmp_path / "states")
    srv = ThreadServer(make_settings(tiny_paths, tmp_path / "state"), backend=backend).start()
    try:
        http = httpx.Client(base_url=srv.url, timeout=120)
        body = {"model": "tiny", "temperature": 0, "max_output_tokens": 3}
        first = http.post("/v1/responses", json={**body, "input": "I am Ada."}).json()
        backend.armed = True
        second = http.post("/v1/responses", json={**body, "input": "I live in Lyon.",
                                                  "previous_response_id": first["id"]})
        assert second.status_code == 200, second.text
        assert second.json()["delta_mem"]["version"] == 2
        backend.blind = True
        third = http.post("/v1/responses", json={**body, "input": "I have a cat.",
                                                 "previous_response_id": second.json()["id"]})
        assert_openai_error(third, 503, "commit_unknown")
        backend.armed = backend.blind = False
        sess = http.get(f"/v1/sessions/{first['id']}").json()
        third_id = third.headers["x-response-id"]
        assert sess["version"] == 3 and sess["last_response_id"] == third_id     # it had landed
        assert third_id in third.json()["error"]["message"]
        assert http.get(f"/v1/responses/{third_id}").status_code == 200
        fourth = http.post("/v1/responses", json={**body, "input": "Where do I live?", "previous_response_id": third_id})
        assert fourth.status_code == 200, fourth.text
        assert fourth.json()["delta_mem"]["version"] == 4
        http.close()
    finally:
        srv.stop()
