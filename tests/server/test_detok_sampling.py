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


def _draws(logits: torch.Tensor, params: SamplingParams, n: int = 200) -> set[int]:
    g = make_generator(params, torch.device("cpu"))
    return {sample_next(logits, params, g) for _ in range(n)}


def test_top_k_and_min_p_restrict_the_draws():
    logits = torch.tensor([2.0, 1.9, 1.8, -5.0, 1.7])
    assert _draws(logits, SamplingParams(max_tokens=1, top_k=2, seed=0)) == {0, 1}
    assert _draws(logits, SamplingParams(max_tokens=1, seed=0)) >= {0, 1, 2, 4}
    # min_p 0.5: keep tokens at least half as likely as the best; exp(-0.3) = 0.74 > 0.5 > exp(-7)
    assert _draws(logits, SamplingParams(max_tokens=1, min_p=0.5, seed=0)) == {0, 1, 2, 4}
    assert _draws(logits, SamplingParams(max_tokens=1, min_p=0.9, seed=0)) == {0, 1}   # exp(-.2)=.82 < .9 < exp(-.1)


def test_penalties_follow_vllm():
    """Repetition divides positive / multiplies negative logits of seen ids (prompt or output);
    frequency subtracts per occurrence in the output, presence once."""
    from server.engine.sampling import _apply_penalties, prompt_mask

    logits = torch.tensor([2.0, -1.0, 3.0, 0.5])
    params = SamplingParams(max_tokens=1, repetition_penalty=2.0, frequency_penalty=0.25, presence_penalty=0.1)
    in_prompt = prompt_mask(params, [0], 4, torch.device("cpu"))
    out = _apply_penalties(logits, params, in_prompt, [1, 2, 2])
    expected = torch.tensor([2.0 / 2, -1.0 * 2 - 0.25 - 0.1, 3.0 / 2 - 0.5 - 0.1, 0.5])
    torch.testing.assert_close(out, expected)
    # greedy sees the penalties: id 2 (3.0) loses to id 0 once it has been generated twice
    assert sample_next(logits, SamplingParams(max_tokens=1, temperature=0), None) == 2
    assert sample_next(logits, params.__class__(**{**params.__dict__, "temperature": 0}), None,
                       in_prompt=in_prompt, output=[1, 2, 2]) == 0


def test_min_tokens_masks_stop_ids_until_reached():
    logits = torch.tensor([0.0, 9.0, 1.0])
    params = SamplingParams(max_tokens=5, temperature=0, min_tokens=2)
    assert sample_next(logits, params, None, output=[2], stop_ids=(1,)) == 2
    assert sample_next(logits, params, None, output=[2, 2], stop_ids=(1,)) == 1


def test_token_logprob_is_raw_log_softmax():
    from server.engine.sampling import token_logprob

    logits = torch.tensor([1.0, 3.0, 2.0, 50.0])
    lp = token_logprob(logits, 2, top=2, valid_vocab=3)   # id 3 is padding: never counted
    ref = torch.log_softmax(logits[:3], dim=-1)
    assert lp.token_id == 2 and abs(lp.logprob - float(ref[2])) < 1e-6
    assert [t for t, _ in lp.top] == [1, 2] and abs(lp.top[0][1] - float(ref[1])) < 1e-6


def test_stop_strings_wait_for_min_tokens(tok):
    ids = tok.encode("hi there hi", add_special_tokens=False)
    eager = IncrementalDetokenizer(tok, ("there",))
    "".join(eager.add(t) for t in ids)
    assert eager.stopped
    held = IncrementalDetokenizer(tok, ("there",), min_tokens=len(ids))
    out = "".join(held.add(t) for t in ids) + held.flush()
    assert not held.stopped and out == "hi there hi"
