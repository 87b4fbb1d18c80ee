"""Next-token selection from one row of logits (pure torch; no engine state).

Order as in HF/vLLM: logit bias → temperature → top-p → sample. temperature ≈ 0 is greedy.
"""

from __future__ import annotations

import torch

from server.engine.base import SamplingParams

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


def sample_next(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None,
                valid_vocab: int | None = None) -> int:
    """Pick a token id from fp32 logits [V]. Ids >= valid_vocab (padded rows of the
    embedding matrix the tokenizer cannot decode) are never chosen."""
    logits = logits.float()
    if valid_vocab is not None and valid_vocab < logits.shape[-1]:
        logits = logits.clone()
        logits[valid_vocab:] = float("-inf")
    if params.logit_bias:
        logits = logits.clone()
        ids = torch.tensor(list(params.logit_bias.keys()), dtype=torch.long, device=logits.device)
        vals = torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype, device=logits.device)
        logits.index_add_(0, ids, vals)
    if params.temperature <= GREEDY_EPS or generator is None:
        return int(torch.argmax(logits).item())
    logits = logits / params.temperature
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass before it already reaches top_p; the top one always stays, even
        # when a denormal top_p compares as 0 (vLLM turns on flush-to-zero in the processes it loads in)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= params.top_p
        drop[0] = False
        sorted_logits[drop] = float("-inf")
        logits = torch.full_like(logits, float("-inf")).scatter(0, order, sorted_logits)
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())
