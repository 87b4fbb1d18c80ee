"""Variable-length (packed) Δ-Mem scan: reference, torch path, and the dispatcher the engines call.

The packed layout is vLLM's: the tokens of all sequences in one `[T_total, h, R]` tensor, sequence b
at `cu_seqlens[b]:cu_seqlens[b+1]`, its state living in `state_pool[slots[b]]` (`[P, h, R, R]` fp32,
updated in place). Tokens of sequence b with relative index `< write_start[b]` read but do not write
(read-only prefixes; `write_start >= length` makes the whole sequence read-only). `zero_init[b]`
starts sequence b from zeros instead of the pool (an empty sequence then leaves its slot zeroed).
Reads come back as `[T_total, h, R]` fp32; tokens outside every sequence read 0. Two sequences
sharing a slot in one call is undefined, except empty ones without zero_init (vLLM's CUDA-graph
padding rows: slot NULL_BLOCK_ID = 0, no tokens), which leave the slot unchanged. The reference,
the torch path and the Triton kernel share this contract exactly.

Dispatch (`varlen_scan`, env `DELTA_MEM_SCAN_IMPL` = auto|torch|triton): "auto" uses the Triton
kernel iff `triton_scan_support` says it can run (CUDA tensors, or CPU under TRITON_INTERPRET=1),
else the torch path; "triton" raises `RuntimeError` with the reason instead of falling back silently.
"""

from __future__ import annotations

import functools
import os

import torch

from .scan import scan, scan_reference
from .triton_scan import (triton_interpret_enabled, triton_interpreter_usable, triton_scan_support,
                          varlen_scan_triton)

Tensor = torch.Tensor

__all__ = ["varlen_scan", "varlen_scan_reference", "varlen_scan_torch", "varlen_scan_triton",
           "triton_scan_support", "triton_interpret_enabled", "triton_interpreter_usable", "SCAN_IMPL_ENV"]

SCAN_IMPL_ENV = "DELTA_MEM_SCAN_IMPL"
_IMPLS = ("auto", "torch", "triton")


@functools.cache
def _interpreting() -> bool:
    """TRITON_INTERPRET must be set before triton is imported (triton_scan.triton_interpreter_usable),
    so the answer cannot change in a process: ask once."""
    return triton_interpret_enabled()


def _alloc_reads(q: Tensor, out: Tensor | None) -> Tensor:
    return torch.zeros(q.shape, dtype=torch.float32, device=q.device) if out is None else out


def varlen_scan_reference(state_pool: Tensor, slots: Tensor, cu_seqlens: Tensor, write_start: Tensor,
                          q: Tensor, k: Tensor, v: Tensor, keep: Tensor, erase: Tensor, write: Tensor,
                          zero_init: Tensor | None = None, *, out: Tensor | None = None) -> Tensor:
    """Obviously-correct oracle: the naive `scan_reference`, one sequence at a time, in batch order."""
    reads = _alloc_reads(q, out)
    cu = [int(x) for x in cu_seqlens.tolist()]
    slot_list = [int(x) for x in slots.tolist()]
    ws_list = [int(x) for x in write_start.tolist()]
    zi_list = [False] * len(slot_list) if zero_init is None else [bool(x) for x in zero_init.tolist()]
    R = state_pool.shape[-1]
    for b, slot in enumerate(slot_list):
        s, e = cu[b], cu[b + 1]
        L = e - s
        state0 = torch.zeros_like(state_pool[slot]) if zi_list[b] else state_pool[slot]
        per_head = lambda x: x[s:e].transpose(0, 1)  # noqa: E731  [h, L, R]
        writes = (torch.arange(L, device=q.device) >= ws_list[b]).expand(state0.shape[0], L)
        final, rd = scan_reference(state0, per_head(q), per_head(k), per_head(v), per_head(keep),
                                   per_head(erase), per_head(write), valid=None, writes=writes)
        state_pool[slot] = final.view(-1, R, R)
        reads[s:e] = rd.transpose(0, 1)
    return reads


def varlen_scan_torch(state_pool: Tensor, slots: Tensor, cu_seqlens: Tensor, write_start: Tensor,
                      q: Tensor, k: Tensor, v: Tensor, keep: Tensor, erase: Tensor, write: Tensor,
                      zero_init: Tensor | None = None, *, out: Tensor | None = None) -> Tensor:
    """Fallback for CPU / no Triton: the dense `scan`, batching all sequences of equal length.

    Grouping by length (rather than padding to the longest) makes a decode batch one call and a mixed
    batch one call per distinct prefill length, with no padded work. Syncs with the host (it reads
    `cu_seqlens`), so it is not CUDA-graph safe; the Triton path is.
    """
    reads = _alloc_reads(q, out)
    T, h, R = q.shape
    dev = q.device
    cu = cu_seqlens.to(device="cpu", dtype=torch.int64)
    lengths = cu[1:] - cu[:-1]
    if lengths.numel() and bool((lengths == 1).all()):
        _decode_step(state_pool, slots, write_start, q, k, v, keep, erase, write, zero_init, reads)
        return reads
    slots_d = slots.to(device=state_pool.device, dtype=torch.int64)
    ws_d = write_start.to(device=dev, dtype=torch.int64)
    zi_d = None if zero_init is None else zero_init.to(device=state_pool.device, dtype=torch.bool)
    for L in sorted(set(lengths.tolist())):
        members = torch.nonzero(lengths == L).flatten()
        G = members.numel()
        m_pool = members.to(state_pool.device)
        grp_slots = slots_d[m_pool]
        state0 = state_pool[grp_slots]                                        # [G,h,R,R] (a copy)
        if zi_d is not None:
            state0 = torch.where(zi_d[m_pool][:, None, None, None], torch.zeros_like(state0), state0)
        idx = (cu[:-1][members][:, None] + torch.arange(L)[None, :]).to(dev)  # [G,L] token indices
        per_head = lambda x: x[idx].permute(0, 2, 1, 3).reshape(G * h, L, R)  # noqa: E731
        writes = torch.arange(L, device=dev)[None, :] >= ws_d[members.to(dev)][:, None]  # [G,L]
        writes = writes[:, None, :].expand(G, h, L).reshape(G * h, L)
        final, rd = scan(state0.reshape(G * h, R, R), per_head(q), per_head(k), per_head(v),
                                 per_head(keep), per_head(erase), per_head(write), valid=None, writes=writes)
        state_pool[grp_slots] = final.view(G, h, R, R).to(state_pool.dtype)
        if L:
            reads[idx] = rd.view(G, h, L, R).permute(0, 2, 1, 3).to(reads.dtype)
    return reads


def _decode_step(state_pool: Tensor, slots: Tensor, write_start: Tensor, q: Tensor, k: Tensor, v: Tensor,
                 keep: Tensor, erase: Tensor, write: Tensor, zero_init: Tensor | None, reads: Tensor) -> None:
    """One token per sequence (a decode step: token b is sequence b's), in a dozen tensor ops with no
    grouping, reshaping or Python loops (on a CPU each op costs microseconds whatever its size)."""
    B = q.shape[0]
    idx = slots if slots.dtype == torch.int64 else slots.long()
    S = state_pool[idx].float()                                                  # [B,h,R,R] (a copy)
    if zero_init is not None:
        S = torch.where(zero_init.to(S.device, torch.bool).view(B, 1, 1, 1), 0.0, S)
    k32 = k.float()
    read, dot = torch.matmul(S, torch.stack([q.float(), k32], dim=-1)).unbind(-1)  # S·q, S·k: [B,h,R]
    coef = torch.addcmul(write.float() * v.float(), erase.float(), dot, value=-1.0)  # write·v − erase·(S·k)
    new = torch.addcmul(keep.float().unsqueeze(-1) * S, coef.unsqueeze(-1), k32.unsqueeze(-2))
    new = torch.where((write_start.to(S.device) <= 0).view(B, 1, 1, 1), new, S)   # read-only rows keep S
    state_pool[idx] = new.to(state_pool.dtype)
    reads[:B] = read


def varlen_scan(state_pool: Tensor, slots: Tensor, cu_seqlens: Tensor, write_start: Tensor,
                q: Tensor, k: Tensor, v: Tensor, keep: Tensor, erase: Tensor, write: Tensor,
                zero_init: Tensor | None = None, *, out: Tensor | None = None,
                impl: str | None = None, max_len: int | None = None) -> Tensor:
    """Run the packed scan with the chosen implementation (module docstring: contract and dispatch).

    `max_len`, the longest sequence when the caller knows it without a device sync (vLLM's
    max_query_len), lets the torch path take its one-token decode step directly.
    """
    choice = (impl if impl is not None else os.environ.get(SCAN_IMPL_ENV, "auto")).strip().lower() or "auto"
    if choice not in _IMPLS:
        raise ValueError(f"unknown scan implementation {choice!r}; expected one of {_IMPLS}")
    args = (state_pool, slots, cu_seqlens, write_start, q, k, v, keep, erase, write, zero_init)
    # on a CPU without the interpreter the answer is always no: skip the checks in the hot path
    if choice != "torch" and (state_pool.device.type != "cpu" or choice == "triton" or _interpreting()):
        ok, reason = triton_scan_support(*args, out)
        if ok:
            return varlen_scan_triton(*args, out=out)
        if choice == "triton":
            raise RuntimeError(f"Triton scan requested but unavailable: {reason}")
    if max_len == 1 and q.shape[0] == slots.shape[0]:
        reads = _alloc_reads(q, out)
        _decode_step(state_pool, slots, write_start, q, k, v, keep, erase, write, zero_init, reads)
        return reads
    return varlen_scan_torch(*args, out=out)
