"""Incremental detokenization with stop strings, and next-token sampling."""

from __future__ import annotations

import pytest
import torch

from delta_mem_vllm.testing.tiny import build_tokenizer
from server.engine.base import SamplingParams
from server.engine.detok import IncrementalDetokenizer
from server.engine.sampling import make_generator, sample_next


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def feed(tok, text: str, stop=()) -> tuple[list[str], IncrementalDetokenizer]:
    d = IncrementalDetokenizer(tok, tuple(stop))
    deltas = []
    for t in tok.encode(text, add_special_tokens=False):
        deltas.append(d.add(t))
        if d.stopped:
            break
    deltas.append(d.flush())
    return deltas, d


def test_roundtrip_unicode(tok):
    text = "héllo wörld — 日本語 ✓ the end"
    deltas, d = feed(tok, text)
    assert "".join(deltas) == text == d.text
    assert all("\ufffd" not in x for x in deltas)  # partial UTF-8 is held back, never emitted


def test_stop_string_cuts_text(tok):
    deltas, d = feed(tok, "the cat sat. STOP here and more", stop=["STOP"])
    assert d.stopped
    assert "".join(deltas) == "the cat sat. "


def test_stop_string_never_partially_streamed(tok):
    text = "abc ST and STOP"
    d = IncrementalDetokenizer(tok, ("STOP",))
    emitted = ""
    for t in tok.encode(text, add_special_tokens=False):
        emitted += d.add(t)
        assert "STO" not in emitted or "STOP" not in text[: len(emitted) + 1]
        if d.stopped:
            break
    emitted += d.flush()
    assert emitted == "abc ST and "


def test_special_tokens_skipped(tok):
    d = IncrementalDetokenizer(tok)
    ids = tok.encode("hi", add_special_tokens=False) + [tok.convert_tokens_to_ids("<|im_end|>")]
    out = "".join(d.add(t) for t in ids) + d.flush()
    assert out == "hi"


def test_greedy_bias_and_vocab_mask():
    logits = torch.tensor([0.0, 5.0, 1.0, 9.0])
    greedy = SamplingParams(max_tokens=1, temperature=0)
    assert sample_next(logits, greedy, None) == 3
    assert sample_next(logits, greedy, None, valid_vocab=3) == 1  # padded ids are never chosen
    biased = SamplingParams(max_tokens=1, temperature=0, logit_bias={2: 100.0})
    assert sample_next(logits, biased, None) == 2


def test_seeded_sampling_is_reproducible_and_top_p_restricts():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(max_tokens=1, temperature=1.0, seed=123)
    a = [sample_next(logits, p, g) for g in [make_generator(p, torch.device("cpu"))] for _ in range(20)]
    b = [sample_next(logits, p, g) for g in [make_generator(p, torch.device("cpu"))] for _ in range(20)]
    assert a == b
    tight = SamplingParams(max_tokens=1, temperature=1.0, top_p=1e-6, seed=1)
    g = make_generator(tight, torch.device("cpu"))
    assert {sample_next(logits, tight, g) for _ in range(20)} == {int(logits.argmax())}


def test_top_p_keeps_the_top_token_under_flush_to_zero():
    """A denormal top_p reads as 0 once flush-to-zero is on (vLLM turns it on): the top token stays."""
    logits = torch.tensor([3.0, 1.0, 0.5])
    params = SamplingParams(max_tokens=1, temperature=1.0, top_p=5e-324)
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-to-zero mode")
    try:
        assert sample_next(logits, params, make_generator(params, torch.device("cpu"))) == 0
    finally:
        torch.set_flush_denormal(False)   # (it returns whether the mode is supported, not the old mode)
