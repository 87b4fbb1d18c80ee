"""Token log-probabilities in OpenAI's two response shapes (pure; the engines report TokenLogprob).

JSON has no -inf: a log-probability of a token the model cannot produce is reported as -9999.0,
as vLLM does.
"""

from __future__ import annotations

from typing import Any

from server.engine.base import TokenLogprob

FLOOR = -9999.0


def _lp(value: float) -> float:
    return value if value > FLOOR else FLOOR     # also maps NaN to the floor


class TokenText:
    """Each token id's own text, cached (a tokenizer decode per id is the slow part)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tok = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._cache[token_id] = self._tok.decode([token_id], skip_special_tokens=False,
                                                            clean_up_tokenization_spaces=False)
        return text


def _entry(text: TokenText, token_id: int, logprob: float) -> dict[str, Any]:
    token = text(token_id)
    return {"token": token, "logprob": _lp(logprob), "bytes": list(token.encode("utf-8", "surrogatepass"))}


def chat_logprobs(entries: list[TokenLogprob], text: TokenText) -> dict[str, Any]:
    """`choices[].logprobs` of a chat completion (or of one streamed chunk)."""
    return {"content": [{**_entry(text, e.token_id, e.logprob),
                         "top_logprobs": [_entry(text, tid, lp) for tid, lp in e.top]} for e in entries],
            "refusal": None}


def completion_logprobs(entries: list[TokenLogprob], text: TokenText, offset: int = 0) -> dict[str, Any]:
    """`choices[].logprobs` of a legacy completion; `offset` is where these tokens' text starts."""
    tokens, offsets = [], []
    for e in entries:
        tokens.append(text(e.token_id))
        offsets.append(offset)
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [_lp(e.logprob) for e in entries],
            "top_logprobs": [{text(tid): _lp(lp) for tid, lp in e.top} for e in entries],
            "text_offset": offsets}
