"""How much memory vLLM's KV cache takes on a CPU when the operator said nothing.

vLLM's CPU backend reads `--gpu-memory-utilization` (default 0.92) as the share of the NUMA node to
reserve and refuses to start when less than that is free: any machine with other programs running
fails. Instead the cache is sized from what the served configuration can use (`max_num_seqs`
requests of `max_model_len` tokens, each with its Δ-Mem state slot), capped by a modest share of
the memory available now, and never below one full-length request (vLLM's own minimum). Pure
arithmetic: the inputs come from the vLLM glue, so it is tested alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

GiB = 1 << 30
MiB = 1 << 20
SHARE = 0.25            # of the memory available now
HEADROOM = 1 * GiB      # left free beyond the weights: activations, the server, the tokenizer


class KvCacheWontFit(ValueError):
    """Even one full-length request does not fit; the message is the one line the operator sees."""


@dataclass(frozen=True)
class KvShape:
    """What one served token and one request cost in the KV cache (per worker)."""

    bytes_per_token: int   # K and V of every attention layer
    block_tokens: int      # tokens per KV block (vLLM on a CPU: 128)
    state_slot_blocks: int = 1   # a request's Δ-Mem state slot takes one block of the shared pool

    def request_bytes(self, tokens: int) -> int:
        blocks = math.ceil(tokens / self.block_tokens) + self.state_slot_blocks
        return blocks * self.block_tokens * self.bytes_per_token


@dataclass(frozen=True)
class KvPlan:
    bytes: int
    reason: str   # how the figure was chosen, for the log


def gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def plan_cpu_kv_cache(shape: KvShape, *, max_model_len: int, max_num_seqs: int, available: int, weights: int,
                      share: float = SHARE, headroom: int = HEADROOM) -> KvPlan:
    """The KV cache size for a CPU start, or KvCacheWontFit naming what is needed and what is free."""
    minimum = shape.request_bytes(max_model_len)
    wanted = max_num_seqs * minimum
    usable = available - weights - headroom
    if minimum > usable:
        raise KvCacheWontFit(
            f"the KV cache needs at least {gib(minimum)} GiB (one request of {max_model_len} tokens) but only "
            f"{gib(available)} GiB of memory is available ({gib(max(usable, 0))} GiB after {gib(weights)} GiB of "
            f"weights and {gib(headroom)} GiB of headroom): lower --max-model-len, or free memory "
            f"(--kv-cache-memory-bytes sets the size by hand)")
    cap = max(minimum, min(usable, int(share * available)) // MiB * MiB)
    chosen = min(wanted, cap)
    full = chosen // minimum
    if chosen == wanted:
        how = f"all {max_num_seqs} requests (--max-num-seqs) at {max_model_len} tokens each"
    else:
        how = (f"{full} request(s) at the full {max_model_len} tokens (more when shorter); {max_num_seqs} at "
               f"full length would take {gib(wanted)} GiB, capped at {share:.0%} of the {gib(available)} GiB "
               f"available")
    return KvPlan(chosen, f"KV cache {gib(chosen)} GiB on the CPU: {how}; --kv-cache-memory-bytes or "
                          f"--gpu-memory-utilization set it by hand")
