"""The OpenAI surface through the official `openai` client against a real uvicorn server."""

from __future__ import annotations

from delta_mem_vllm.testing.tiny import build_tokenizer

A_ID = str(build_tokenizer().convert_tokens_to_ids("a"))
MSGS = [{"role": "system", "content": "You are tiny."}, {"role": "user", "content": "Say something."}]


def test_models(client, server):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    m = client.models.retrieve("tiny")
    assert m.id == "tiny" and m.object == "model"
    extra = m.model_extra
    assert extra["max_model_len"] == 4096
    assert extra["delta_mem"]["adapter_fingerprint"] == server.ctx.engine.adapter_fingerprint


def test_chat_non_stream_and_usage(client, server):
    r = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=5, temperature=0,
                                       extra_body={"return_token_ids": True, "ignore_eos": True})
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    tok = server.ctx.engine.tokenizer
    prompt = tok.apply_chat_template(MSGS, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert r.model_extra["prompt_token_ids"] == prompt
    assert r.usage.prompt_tokens == len(prompt)
    assert r.usage.completion_tokens == 5 == len(choice.model_extra["token_ids"])
    assert r.usage.total_tokens == len(prompt) + 5
    assert choice.message.content == tok.decode(choice.model_extra["token_ids"], skip_special_tokens=True)
    # a stateless request stores nothing
    assert r.model_extra["delta_mem"]["session_id"] is None and not r.model_extra["delta_mem"]["committed"]


def test_chat_stream_matches_non_stream(client):
    full = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=8, temperature=0)
    stream = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=8, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == full.choices[0].message.content
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_sampling_seed_and_stop(client):
    kw = dict(model="tiny", messages=MSGS, max_tokens=12, temperature=1.0, top_p=0.9, seed=1234)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert a.choices[0].message.content == b.choices[0].message.content
    forced = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=20, temperature=0,
                                            stop=["aaa"], logit_bias={A_ID: 100})
    assert forced.choices[0].finish_reason == "stop" and forced.choices[0].message.content == ""
    assert forced.usage.completion_tokens == 3
    bias = client.chat.completions.create(model="tiny", messages=MSGS, max_tokens=4, temperature=0,
                                          logit_bias={A_ID: 100})
    assert bias.choices[0].message.content == "aaaa"


def test_completions(client, server):
    tok = server.ctx.engine.tokenizer
    r = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(tok.encode("Once upon a time")) and r.usage.completion_tokens == 5
    chunks = list(client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    ids = client.completions.create(model="tiny", prompt=tok.encode("Once upon a time"), max_tokens=5,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert ids.choices[0].text == r.choices[0].text


def test_session_id_header_is_echoed(client, http):
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=MSGS, max_tokens=2, temperature=0, extra_headers={"X-Session-ID": "hdr-1"})
    assert raw.headers["x-session-id"] == "hdr-1"
    assert raw.parse().model_extra["delta_mem"]["session_id"] == "hdr-1"
    # the body wins (same value given twice is fine); the id is echoed on streams too
    with http.stream("POST", "/v1/chat/completions", headers={"X-Session-ID": "hdr-1"},
                     json={"model": "tiny", "messages": MSGS, "max_tokens": 2, "stream": True,
                           "session_id": "hdr-1"}) as r:
        assert r.status_code == 200 and r.headers["x-session-id"] == "hdr-1"
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    s = http.get("/v1/sessions/hdr-1").json()
    assert s["turns"] == 2 and s["version"] == 2
