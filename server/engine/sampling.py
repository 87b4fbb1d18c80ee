"""Next-token selection from one row of logits (pure torch; no engine state).

The embedded engine's sampler, in vLLM's order so that both engines pick the same greedy tokens:
min_tokens and logit bias → repetition/frequency/presence penalties → (greedy argmax) → temperature
→ min_p → top-k → top-p → sample. Log-probabilities are reported from the raw logits, before any
of that, as vLLM does by default.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from server.engine.base import SamplingParams, TokenLogprob

GREEDY_EPS = 1e-5


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A private RNG per request so concurrent requests never perturb each other's draws."""
    if params.temperature <= GREEDY_EPS:
        return None
    gen = torch.Generator(device=device)
    if params.seed is not None:
        gen.manual_seed(params.seed)
    else:
        gen.seed()
    return gen


def prompt_mask(params: SamplingParams, prompt: Sequence[int], vocab: int, device: torch.device) -> torch.Tensor | None:
    """Which ids occur in the prompt, when a repetition penalty needs it (computed once per request)."""
    if params.repetition_penalty == 1.0:
        return None
    mask = torch.zeros(vocab, dtype=torch.bool, device=device)
    if prompt:
        mask[torch.tensor(list(prompt), dtype=torch.long, device=device).clamp_max(vocab - 1)] = True
    return mask


def _mask_invalid(logits: torch.Tensor, valid_vocab: int | None) -> torch.Tensor:
    logits = logits.float()
    if valid_vocab is not None and valid_vocab < logits.shape[-1]:
        logits = logits.clone()
        logits[valid_vocab:] = float("-inf")
    return logits


def _apply_penalties(logits: torch.Tensor, params: SamplingParams, in_prompt: torch.Tensor | None,
                     output: Sequence[int]) -> torch.Tensor:
    counts = None
    if output and (params.repetition_penalty != 1.0 or params.presence_penalty or params.frequency_penalty):
        counts = torch.bincount(torch.tensor(list(output), dtype=torch.long, device=logits.device),
                                minlength=logits.shape[-1])[:logits.shape[-1]].to(logits.dtype)
    if params.repetition_penalty != 1.0:
        seen = in_prompt.clone() if in_prompt is not None else torch.zeros_like(logits, dtype=torch.bool)
        if counts is not None:
            seen |= counts > 0
        penalty = torch.where(seen, params.repetition_penalty, 1.0)
        logits = logits * torch.where(logits > 0, 1.0 / penalty, penalty)
    if counts is not None:
        logits = logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def _truncate(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """min_p, top-k, top-p on temperature-scaled logits; the most likely token always survives."""
    if params.min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < probs.max() * params.min_p, float("-inf"))
    if 0 < params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p; the top one always stays, even
        # when a denormal top_p compares as 0 (vLLM turns on flush-to-zero in the processes it loads in)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        drop[0] = False
        sorted_logits[drop] = float("-inf")
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    return logits


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                valid_vocab: int | None = None, *, in_prompt: torch.Tensor | None = None,
                output: Sequence[int] = (), stop_ids: Sequence[int] = ()) -> int:
    """Pick a token id from logits [V]. Ids >= valid_vocab (padded rows of the embedding matrix the
    tokenizer cannot decode) are never chosen. `output` is what this request generated so far,
    `in_prompt` its prompt_mask(), `stop_ids` the ids min_tokens holds back (EOS and stop ids)."""
    logits = _mask_invalid(logits, valid_vocab)
    if params.min_tokens and len(output) < params.min_tokens and stop_ids:
        logits = logits.clone()
        logits[torch.tensor(list(stop_ids), dtype=torch.long, device=logits.device)] = float("-inf")
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias.keys()), dtype=torch.long, device=logits.device)
        vals = torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype, device=logits.device)
        logits = logits.index_add(0, ids, vals)
    logits = _apply_penalties(logits, params, in_prompt, output)
    if params.temperature <= GREEDY_EPS or generator is None:
        return int(torch.argmax(logits).item())
    logits = _truncate(logits / params.temperature, params)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())


def token_logprob(logits: torch.Tensor, token: int, top: int, valid_vocab: int | None = None) -> TokenLogprob:
    """The sampled token's raw log-probability and the `top` most likely ids (vLLM's raw_logprobs)."""
    logprobs = torch.log_softmax(_mask_invalid(logits, valid_vocab), dim=-1)
    alternatives: tuple[tuple[int, float], ...] = ()
    if top > 0:
        values, ids = torch.topk(logprobs, min(top, logprobs.shape[-1]))
        alternatives = tuple(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), alternatives)
