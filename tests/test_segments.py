"""Message / sentence id assignment for the segment write granularities."""

from __future__ import annotations

import random

import pytest
import torch

from delta_mem_vllm.segments import (
    ChatSegments,
    chat_segment_ids,
    count_non_system_messages,
    generated_token_ids,
    split_sentences,
)
from delta_mem_vllm.testing.tiny import CHAT_TEMPLATE, build_tokenizer
from tests.helpers import VARIANTS, make_dm

IM_START, IM_END = 289, 290

CHAT = [
    {"role": "system", "content": "You are terse. Answer briefly."},
    {"role": "user", "content": "Hi there. How are you?"},
    {"role": "assistant", "content": 'Fine! Thanks: "ok." (yes.) Bye\n\nPS: later'},
    {"role": "user", "content": "What is the plan; and when?"},
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _render(tok, messages, add_generation_prompt: bool) -> list[int]:
    return tok.apply_chat_template(messages, tokenize=True, return_dict=False,
                                   add_generation_prompt=add_generation_prompt)


# --- split_sentences ------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("", [""]),
    ("no boundary here", ["no boundary here"]),
    ("single\nnewline stays", ["single\nnewline stays"]),
    ("Hi. Bye.", ["Hi.", " Bye."]),
    ("Wait... what?! Yes; no: maybe", ["Wait...", " what?!", " Yes;", " no:", " maybe"]),
    ('He said "stop." Then left.', ['He said "stop.', '" Then left.']),
    ("(Done.) Next", ["(Done.", ") Next"]),
    ("\u201cQuoted.\u201d Next", ["\u201cQuoted.", "\u201d Next"]),
    ("Done.])  x", ["Done.", "])  x"]),
    ("See e.g. the docs.", ["See e.g.", " the docs."]),       # abbreviations split like sentences
    ("v1.2.3 is out; pi=3.14", ["v1.2.3 is out;", " pi=3.14"]),  # no whitespace → no boundary
    ("x.)y", ["x.)y"]),
    ("A.\n\nB", ["A.", "\n\nB"]),
    ("para one\n\npara two\n\n\nthree", ["para one", "\n\npara two", "\n\n\nthree"]),
    ("\n\nleading", ["\n\nleading"]),
    ("Trailing. ", ["Trailing.", " "]),
    ("End.\n", ["End.", "\n"]),
])
def test_split_sentences(text: str, expected: list[str]) -> None:
    assert split_sentences(text) == expected
    assert "".join(split_sentences(text)) == text


def test_split_sentences_round_trips_random_text() -> None:
    rng = random.Random(0)
    alphabet = "ab .!?;:\"')]\n\t\u201d\u2019"
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        chunks = split_sentences(text)
        assert "".join(chunks) == text
        assert all(chunks) or chunks == [""]


# --- message ids ------------------------------------------------------------------------------------

def test_message_ids_cover_whole_template_blocks(tok) -> None:
    seg = chat_segment_ids(tok, CHAT)
    assert isinstance(seg, ChatSegments)
    assert seg.input_ids == _render(tok, CHAT, True)
    # The tiny ChatML renders each message as a self-contained block.
    blocks = [len(_render(tok, [m], False)) for m in CHAT]
    prompt = len(seg) - len(_render(tok, CHAT, False))
    assert prompt == 3  # <|im_start|>assistant\n
    expected = [-1] * blocks[0] + [0] * blocks[1] + [1] * blocks[2] + [2] * blocks[3] + [-1] * prompt
    assert seg.message_ids == expected
    assert seg.sentence_ids == [-1] * len(seg)
    # Each message's block starts at its <|im_start|> and ends with "<|im_end|>\n".
    starts = [i for i, t in enumerate(seg.input_ids) if t == IM_START]
    assert [seg.message_ids[i] for i in starts] == [-1, 0, 1, 2, -1]
    ends = [i for i, t in enumerate(seg.input_ids) if t == IM_END]
    assert [seg.message_ids[i + 1] for i in ends] == [-1, 0, 1, 2]

    no_prompt = chat_segment_ids(tok, CHAT, add_generation_prompt=False)
    assert no_prompt.input_ids == _render(tok, CHAT, False)
    assert no_prompt.message_ids == expected[:-prompt]


def test_message_ids_without_system_and_empty_chat(tok) -> None:
    seg = chat_segment_ids(tok, CHAT[1:3])
    assert sorted(set(seg.message_ids)) == [-1, 0, 1]
    assert seg.message_ids[0] == 0 and seg.message_ids[-3:] == [-1, -1, -1]
    with pytest.raises(ValueError, match="empty"):
        chat_segment_ids(tok, [])


# --- sentence ids -----------------------------------------------------------------------------------

def test_sentence_ids_are_global_and_cover_content_only(tok) -> None:
    seg = chat_segment_ids(tok, CHAT, sentences=True)
    assert seg.input_ids == _render(tok, CHAT, True)
    active = [s for s in seg.sentence_ids if s >= 0]
    assert active == sorted(active), "sentence ids increase along the sequence"
    expected_chunks = [c for m in CHAT if m["role"] != "system" for c in split_sentences(m["content"])]
    assert sorted(set(active)) == list(range(len(expected_chunks)))
    for sid, chunk in enumerate(expected_chunks):
        toks = [t for t, s in zip(seg.input_ids, seg.sentence_ids) if s == sid]
        assert tok.decode(toks) == chunk
    # Content tokens only: per message, the labelled tokens decode to exactly the content.
    for mid, message in enumerate(m for m in CHAT if m["role"] != "system"):
        toks = [t for t, m, s in zip(seg.input_ids, seg.message_ids, seg.sentence_ids) if m == mid and s >= 0]
        assert tok.decode(toks) == message["content"]
    # System and template tokens carry no sentence.
    assert all(s == -1 for m, s in zip(seg.message_ids, seg.sentence_ids) if m == -1)
    assert all(s == -1 for t, s in zip(seg.input_ids, seg.sentence_ids) if t in (IM_START, IM_END))
    # Message ids do not depend on the sentence option.
    assert seg.message_ids == chat_segment_ids(tok, CHAT).message_ids


def test_content_not_found_in_template_gets_no_sentences(tok) -> None:
    trim = CHAT_TEMPLATE.replace("message['content']", "(message['content'] | trim)")
    chat = [{"role": "user", "content": " Padded. Content. "}, {"role": "user", "content": "Next. One."}]
    seg = chat_segment_ids(tok, chat, sentences=True, chat_template_kwargs={"chat_template": trim})
    first = [s for m, s in zip(seg.message_ids, seg.sentence_ids) if m == 0]
    second = [s for m, s in zip(seg.message_ids, seg.sentence_ids) if m == 1]
    assert set(first) == {-1}, "content tokens not found → the whole message is unsegmented"
    assert sorted(set(second) - {-1}) == [0, 1], "the global counter is not consumed by it"


class _MergingTokenizer:
    """Char-level tokenizer where ". " is one token: a merge across a sentence boundary."""

    START, END, DOT_SPACE = 1001, 1002, 1000

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        out, i = [], 0
        while i < len(text):
            if text.startswith(". ", i):
                out.append(self.DOT_SPACE)
                i += 2
            else:
                out.append(ord(text[i]))
                i += 1
        return out

    def apply_chat_template(self, messages, *, tokenize: bool, return_dict: bool,
                            add_generation_prompt: bool) -> list[int]:
        ids: list[int] = []
        for m in messages:
            ids += [self.START] + self.encode(m["role"] + "\n" + m["content"]) + [self.END] + self.encode("\n")
        if add_generation_prompt:
            ids += [self.START] + self.encode("assistant\n")
        return ids


def test_chunk_tokenisation_mismatch_gives_one_sentence() -> None:
    tok = _MergingTokenizer()
    chat = [{"role": "user", "content": "One. Two"}, {"role": "assistant", "content": "A! B"}]
    seg = chat_segment_ids(tok, chat, sentences=True)
    first = [s for m, s in zip(seg.message_ids, seg.sentence_ids) if m == 0 and s >= 0]
    second = [s for m, s in zip(seg.message_ids, seg.sentence_ids) if m == 1 and s >= 0]
    assert first == [0] * len(tok.encode("One. Two"))
    assert second == [1, 1, 2, 2], "'A!' and ' B' are the next two sentences"
    assert generated_token_ids(seg, 2) == (2, 3)


# --- prefix stability -------------------------------------------------------------------------------

_COUNTING_TEMPLATE = (
    "{{- '<|im_start|>system\\n' + (messages | length | string) + ' turns<|im_end|>\\n' -}}"
    + CHAT_TEMPLATE
)


def test_non_prefix_stable_template_raises(tok) -> None:
    kwargs = {"chat_template": _COUNTING_TEMPLATE}
    chat = [{"role": "user", "content": "Hello there, how are you doing on this fine day?"},
            {"role": "assistant", "content": "Good."}]
    with pytest.raises(ValueError, match="not prefix-stable"):
        chat_segment_ids(tok, chat, chat_template_kwargs=kwargs)
    # A single message never rolls back; an unlimited rollback re-labels the re-rendered tokens.
    assert chat_segment_ids(tok, chat[:1], chat_template_kwargs=kwargs).message_ids[0] == 0
    seg = chat_segment_ids(tok, chat, chat_template_kwargs=kwargs, max_rollback=10**6)
    assert seg.input_ids == tok.apply_chat_template(chat, tokenize=True, return_dict=False,
                                                    add_generation_prompt=True, **kwargs)
    # Everything after the diverging count token was re-emitted by message 1's render.
    assert seg.message_ids[:3] == [0, 0, 0] and set(seg.message_ids[3:-3]) == {1}


def test_small_rollbacks_are_tolerated(tok) -> None:
    # The last message gets a trailing marker that the next render drops: a 1-token rollback per step.
    marked = CHAT_TEMPLATE.replace(
        "'<|im_end|>' + '\\n' -}}",
        "'<|im_end|>' + '\\n' -}}"
        "{%- if loop.last and not add_generation_prompt -%}{{- '<|endoftext|>' -}}{%- endif -%}")
    assert marked != CHAT_TEMPLATE
    kwargs = {"chat_template": marked}
    seg = chat_segment_ids(tok, CHAT, chat_template_kwargs=kwargs)
    assert seg.input_ids == _render(tok, CHAT, True)  # the marker is gone with the generation prompt
    plain = chat_segment_ids(tok, CHAT)
    assert seg.message_ids == plain.message_ids
    closed = chat_segment_ids(tok, CHAT, chat_template_kwargs=kwargs, add_generation_prompt=False)
    # the trailing <|endoftext|> (288) belongs to the last turn
    assert closed.input_ids[-1] == 288 and closed.message_ids[-1] == 2
    with pytest.raises(ValueError, match="not prefix-stable"):
        chat_segment_ids(tok, CHAT, chat_template_kwargs=kwargs, max_rollback=0)


# --- generated tokens -------------------------------------------------------------------------------

def test_generated_token_ids(tok) -> None:
    n = count_non_system_messages(CHAT)
    assert n == 3
    with_sentences = chat_segment_ids(tok, CHAT, sentences=True)
    assert generated_token_ids(with_sentences, n) == (3, max(with_sentences.sentence_ids) + 1)
    assert generated_token_ids(chat_segment_ids(tok, CHAT), n) == (3, 0)


# --- end to end with the library ---------------------------------------------------------------------

def test_message_mean_end_to_end(tok) -> None:
    variant = {**VARIANTS["released_like"], "memory_write_granularity": "message_mean"}
    dm = make_dm("qwen3", variant)
    token_dm = make_dm("qwen3", {**variant, "memory_write_granularity": "token"})
    seg = chat_segment_ids(tok, CHAT)
    ids = torch.tensor([seg.input_ids])
    msg = torch.tensor([seg.message_ids])
    with torch.no_grad():
        out = dm(ids, message_ids=msg, use_cache=True)
        base = dm.model(ids).logits
        no_ids = dm(ids)
        token = token_dm(ids)
    assert torch.equal(out.logits, base), "S5: a fresh-state message_mean call reads zeros everywhere"
    assert out.state.abs().max() > 0.01, "the messages were written"
    assert not torch.allclose(out.state, token.state), "segment writes differ from token writes"
    assert torch.equal(no_ids.logits, token.logits) and torch.equal(no_ids.state, token.state)

    # A decode step: one token labelled with the reply's message id is a single-token write.
    mid, sid = generated_token_ids(seg, count_non_system_messages(CHAT))
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
    with torch.no_grad():
        step = dm(nxt, state=out.state, past_key_values=out.past_key_values,
                  message_ids=torch.tensor([[mid]]), sentence_ids=torch.tensor([[sid]]))
    assert not torch.equal(step.state, out.state)


def test_sentence_mean_end_to_end(tok) -> None:
    dm = make_dm("qwen3", {**VARIANTS["released_like"], "memory_write_granularity": "sentence_mean"})
    seg = chat_segment_ids(tok, CHAT, sentences=True)
    ids = torch.tensor([seg.input_ids])
    with torch.no_grad():
        out = dm(ids, message_ids=torch.tensor([seg.message_ids]), sentence_ids=torch.tensor([seg.sentence_ids]))
        base = dm.model(ids).logits
    assert torch.equal(out.logits, base)
    assert out.state.abs().max() > 0.01
