"""Triton kernel for the variable-length Δ-Mem scan (the vLLM plugin's hot path).

Contract (shared with `varlen.varlen_scan_reference` and the torch path):

* `q, k, v, keep, erase, write`: `[T_total, h, R]`, the packed tokens of all sequences (fp32/bf16/fp16;
  all arithmetic is fp32). `h` independent R×R states per sequence ("state heads").
* `state_pool`: `[P, h, R, R]` fp32, updated in place: sequence b starts from `state_pool[slots[b]]`
  (or zeros where `zero_init[b]`) and its final state is stored back there. Arbitrary strides are
  allowed, so a view into vLLM's padded state pages works without a copy.
* `slots [B]`, `cu_seqlens [B+1]`, `write_start [B]`: integer tensors. Sequence b owns tokens
  `cu_seqlens[b]:cu_seqlens[b+1]`; its tokens with relative index `< write_start[b]` only read.
* Returns `reads [T_total, h, R]` fp32 (or fills `out`); tokens outside every sequence are left 0
  (untouched when `out` is given). Two sequences sharing a slot in one call is undefined, except
  empty ones without zero_init (CUDA-graph padding rows), which leave the slot unchanged.

Design. Grid `(B, h, ceil(R / BLOCK_I))`: one program per (sequence, state head, block of state
rows). Rows are independent given the token's vectors, so a row block is the natural unit: for
R ≤ 16 (R = 8 in the released adapter) one program holds the whole state in fp32 registers and loads
each token's q/k once; for larger R a few programs split the rows (8–16 each), which bounds the
register footprint and multiplies parallelism, at the cost of re-reading q/k from L1/L2 a few times.
One program per single row (the reference kernel) would load q/k R times per token
for no gain at small R. Each program walks its tokens sequentially: the read-only prefix in a loop
that leaves the state alone, then the writing tokens, with the next token's vectors loaded one step
ahead so that global-memory latency overlaps the dependent state update (the chain is inherently
sequential; a chunked parallel-in-time form, like `scan.scan_chunked`, would be the next step for
very long prefills). `_launch_config` was checked with ptxas (sm_90, no spills at R = 2…256);
timings on a GPU are still to be measured.

CUDA-graph safe: the wrapper never syncs with the host (no `.item()`/`.tolist()`), the grid depends
only on B, h and R, and the sequence bounds are read on the device. vLLM pads graph rows with
`slots = NULL_BLOCK_ID` and empty sequences, which just rewrite that slot unchanged.
"""

from __future__ import annotations

import os

import torch

Tensor = torch.Tensor

try:  # guarded: `delta_mem_vllm.ops.varlen` must import (and fall back to torch) without Triton
    import triton
    import triton.language as tl
    _TRITON_IMPORT_ERROR: str | None = None
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _TRITON_IMPORT_ERROR = f"triton is not importable ({type(exc).__name__}: {exc})"

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT_DTYPES = (torch.int32, torch.int64)


def _launch_config(R: int) -> tuple[int, int, int]:
    """(BLOCK_R, BLOCK_I, num_warps) for rank R: whole state per program up to R = 16, then row
    blocks; chosen so that ptxas (sm_90) reports no register spills for R = 2…256."""
    block_r = 1 << max(R - 1, 0).bit_length()          # next power of two (≥ 1)
    block_i = min(block_r, 16) if block_r <= 32 else 8
    num_warps = 1 if block_r <= 16 else (2 if block_r <= 64 else 4)
    return block_r, block_i, num_warps


def triton_interpret_enabled() -> bool:
    """Whether Triton is set to interpret kernels on the CPU (TRITON_INTERPRET=1 right now)."""
    if triton is not None:
        try:
            return bool(triton.knobs.runtime.interpret)
        except AttributeError:  # pragma: no cover - older triton without knobs
            pass
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def triton_interpreter_usable() -> tuple[bool, str]:
    """Whether CPU tensors can go through the Triton interpreter in this process, and if not, why.

    Triton decides interpreter vs compiler when a function is `@triton.jit`-decorated. Our kernel is
    jitted lazily (`_get_kernel`), but the standard-library helpers it calls (`tl.sum` is a jitted
    reduction) are jitted when `triton.language` is imported. So TRITON_INTERPRET=1 must already be
    set when triton is first imported; setting it later yields "Cannot call @triton.jit'd outside
    of the scope of a kernel" at launch, which this check turns into a clear reason instead.
    """
    if triton is None:
        return False, _TRITON_IMPORT_ERROR or "triton is not importable"
    if not triton_interpret_enabled():
        return False, "the Triton interpreter is not enabled (TRITON_INTERPRET=1)"
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except Exception as exc:  # pragma: no cover
        return False, f"the Triton interpreter is not available ({exc})"
    if not isinstance(tl.standard.sum, InterpretedFunction):
        return False, ("TRITON_INTERPRET=1 was set after triton was imported; "
                       "the interpreter needs it set before the first `import triton`")
    return True, "ok"


def triton_scan_support(state_pool: Tensor, slots: Tensor, cu_seqlens: Tensor, write_start: Tensor,
                        q: Tensor, k: Tensor, v: Tensor, keep: Tensor, erase: Tensor, write: Tensor,
                        zero_init: Tensor | None = None, out: Tensor | None = None) -> tuple[bool, str]:
    """Say whether `varlen_scan_triton` can run on these tensors, and if not, why (never syncs)."""
    if triton is None:
        return False, _TRITON_IMPORT_ERROR or "triton is not importable"
    named = {"state_pool": state_pool, "slots": slots, "cu_seqlens": cu_seqlens, "write_start": write_start,
             "q": q, "k": k, "v": v, "keep": keep, "erase": erase, "write": write}
    if zero_init is not None:
        named["zero_init"] = zero_init
    if out is not None:
        named["out"] = out
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            return False, f"{name} is not a tensor"
    devices = {t.device for t in named.values()}
    if len(devices) != 1:
        return False, "tensors are on different devices: " + ", ".join(
            f"{n}={t.device}" for n, t in named.items())
    if state_pool.dim() != 4 or state_pool.shape[-1] != state_pool.shape[-2]:
        return False, f"state_pool must be [P,h,R,R], got {tuple(state_pool.shape)}"
    if state_pool.dtype != torch.float32:
        return False, f"state_pool must be float32, got {state_pool.dtype}"
    _, h, R, _ = state_pool.shape
    for name in ("q", "k", "v", "keep", "erase", "write"):
        t = named[name]
        if t.dim() != 3 or t.shape[1:] != (h, R):
            return False, f"{name} must be [T,{h},{R}] like the state, got {tuple(t.shape)}"
        if t.shape != q.shape:
            return False, f"{name} shape {tuple(t.shape)} differs from q {tuple(q.shape)}"
        if t.dtype not in _FLOAT_DTYPES:
            return False, f"{name} dtype {t.dtype} not in fp32/bf16/fp16"
    B = slots.shape[0] if slots.dim() == 1 else -1
    for name, size in (("slots", B), ("cu_seqlens", B + 1), ("write_start", B)):
        t = named[name]
        if t.dim() != 1 or t.shape[0] != size or t.dtype not in _INT_DTYPES:
            return False, f"{name} must be int32/int64 of shape [{size}], got {t.dtype} {tuple(t.shape)}"
    if zero_init is not None and (zero_init.dim() != 1 or zero_init.shape[0] != B
                                  or zero_init.dtype not in (torch.bool, torch.uint8, torch.int8, *_INT_DTYPES)):
        return False, f"zero_init must be bool [{B}], got {zero_init.dtype} {tuple(zero_init.shape)}"
    if out is not None and (out.shape != q.shape or out.dtype != torch.float32):
        return False, f"out must be float32 {tuple(q.shape)}, got {out.dtype} {tuple(out.shape)}"
    device = devices.pop()
    if device.type == "cpu":
        usable, why = triton_interpreter_usable()
        if not usable:
            return False, f"tensors are on the CPU, not CUDA, and {why}"
    elif device.type != "cuda":
        return False, f"tensors are on {device}, not CUDA"
    return True, "ok"


if triton is not None:

    def _varlen_scan_kernel(
        pool_ptr, slots_ptr, cu_ptr, ws_ptr, zi_ptr,
        q_ptr, k_ptr, v_ptr, keep_ptr, erase_ptr, write_ptr, out_ptr,
        sp0, sp1, sp2, sp3,                     # state_pool strides
        sq0, sq1, sq2, sk0, sk1, sk2, sv0, sv1, sv2,
        sg0, sg1, sg2, se0, se1, se2, sw0, sw1, sw2,
        so0, so1, so2,
        R,
        HAS_ZERO_INIT: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_R: tl.constexpr,
    ):
        b = tl.program_id(0)
        hh = tl.program_id(1).to(tl.int64)
        rows = tl.program_id(2) * BLOCK_I + tl.arange(0, BLOCK_I)
        cols = tl.arange(0, BLOCK_R)
        rmask = rows < R
        cmask = cols < R
        smask = rmask[:, None] & cmask[None, :]

        slot = tl.load(slots_ptr + b).to(tl.int64)
        start = tl.load(cu_ptr + b).to(tl.int64)
        end = tl.load(cu_ptr + b + 1).to(tl.int64)
        wstart = tl.minimum(tl.maximum(start + tl.load(ws_ptr + b).to(tl.int64), start), end)

        s_ptrs = pool_ptr + slot * sp0 + hh * sp1 + rows[:, None] * sp2 + cols[None, :] * sp3
        S = tl.load(s_ptrs, mask=smask, other=0.0).to(tl.float32)
        if HAS_ZERO_INIT:
            zero = tl.load(zi_ptr + b) != 0
            S = tl.where(zero, 0.0, S)  # not `* 0`: the pool may hold NaN garbage

        qh = q_ptr + hh * sq1
        kh = k_ptr + hh * sk1
        vh = v_ptr + hh * sv1
        gh = keep_ptr + hh * sg1
        eh = erase_ptr + hh * se1
        wh = write_ptr + hh * sw1
        oh = out_ptr + hh * so1

        # Read-only prefix: reads S·q with the state fixed.
        for t in range(start, wstart):
            qt = tl.load(qh + t * sq0 + cols * sq2, mask=cmask, other=0.0).to(tl.float32)
            tl.store(oh + t * so0 + rows * so2, tl.sum(S * qt[None, :], axis=1), mask=rmask)

        # Writing tokens, with the next token's vectors prefetched one step ahead.
        # Masks for the prefetched token: all lanes off past the sequence end (a vector compare,
        # since the interpreter rejects scalar-and-vector mask `&`).
        lim = (wstart < end).to(tl.int32) * R
        qt = tl.load(qh + wstart * sq0 + cols * sq2, mask=cols < lim, other=0.0).to(tl.float32)
        kt = tl.load(kh + wstart * sk0 + cols * sk2, mask=cols < lim, other=0.0).to(tl.float32)
        vt = tl.load(vh + wstart * sv0 + rows * sv2, mask=rows < lim, other=0.0).to(tl.float32)
        gt = tl.load(gh + wstart * sg0 + rows * sg2, mask=rows < lim, other=0.0).to(tl.float32)
        et = tl.load(eh + wstart * se0 + rows * se2, mask=rows < lim, other=0.0).to(tl.float32)
        wt = tl.load(wh + wstart * sw0 + rows * sw2, mask=rows < lim, other=0.0).to(tl.float32)
        for t in range(wstart, end):
            n = t + 1
            lim = (n < end).to(tl.int32) * R
            qn = tl.load(qh + n * sq0 + cols * sq2, mask=cols < lim, other=0.0).to(tl.float32)
            kn = tl.load(kh + n * sk0 + cols * sk2, mask=cols < lim, other=0.0).to(tl.float32)
            vn = tl.load(vh + n * sv0 + rows * sv2, mask=rows < lim, other=0.0).to(tl.float32)
            gn = tl.load(gh + n * sg0 + rows * sg2, mask=rows < lim, other=0.0).to(tl.float32)
            en = tl.load(eh + n * se0 + rows * se2, mask=rows < lim, other=0.0).to(tl.float32)
            wn = tl.load(wh + n * sw0 + rows * sw2, mask=rows < lim, other=0.0).to(tl.float32)

            tl.store(oh + t * so0 + rows * so2, tl.sum(S * qt[None, :], axis=1), mask=rmask)
            dot = tl.sum(S * kt[None, :], axis=1)
            S = (gt[:, None] * S
                 - (et * dot)[:, None] * kt[None, :]
                 + (wt * vt)[:, None] * kt[None, :])

            qt, kt, vt, gt, et, wt = qn, kn, vn, gn, en, wn

        tl.store(s_ptrs, S, mask=smask)


_KERNELS: dict[bool, object] = {}


def _get_kernel(interpret: bool):
    """JIT the kernel once per mode: Triton picks interpreter vs compiler at decoration time.

    (A CUDA launch while TRITON_INTERPRET=1 is set would also be interpreted, as with any kernel.)
    """
    kern = _KERNELS.get(interpret)
    if kern is None:
        kern = _KERNELS[interpret] = triton.jit(_varlen_scan_kernel)
    return kern


def varlen_scan_triton(state_pool: Tensor, slots: Tensor, cu_seqlens: Tensor, write_start: Tensor,
                       q: Tensor, k: Tensor, v: Tensor, keep: Tensor, erase: Tensor, write: Tensor,
                       zero_init: Tensor | None = None, *, out: Tensor | None = None) -> Tensor:
    """Run the scan with the Triton kernel (see the module docstring for the contract and design)."""
    ok, reason = triton_scan_support(state_pool, slots, cu_seqlens, write_start, q, k, v, keep, erase,
                                     write, zero_init, out)
    if not ok:
        raise RuntimeError(f"Triton scan requested but unavailable: {reason}")
    T, h, R = q.shape
    B = slots.shape[0]
    if out is None:
        out = torch.zeros((T, h, R), dtype=torch.float32, device=q.device)
    if B == 0 or h == 0 or R == 0:
        return out
    if zero_init is not None and zero_init.dtype == torch.bool:
        zero_init = zero_init.view(torch.uint8)  # zero-copy; avoids i1 pointers
    block_r, block_i, num_warps = _launch_config(R)
    grid = (B, h, triton.cdiv(R, block_i))
    kernel = _get_kernel(triton_interpret_enabled())
    kernel[grid](
        state_pool, slots, cu_seqlens, write_start, zero_init if zero_init is not None else slots,
        q, k, v, keep, erase, write, out,
        *state_pool.stride(), *q.stride(), *k.stride(), *v.stride(),
        *keep.stride(), *erase.stride(), *write.stride(), *out.stride(),
        R,
        HAS_ZERO_INIT=zero_init is not None, BLOCK_I=block_i, BLOCK_R=block_r,
        num_warps=num_warps, enable_fp_fusion=True,  # explicit: Triton 3.10 flips the default
    )
    return out


def _aot_compile(R: int, *, io_dtype: torch.dtype = torch.bfloat16, has_zero_init: bool = True,
                 capability: int = 90):
    """Compile the kernel for a CUDA target without a GPU (ptxas included), returning Triton's
    compiled kernel. Lets CPU-only CI catch compiler-only errors the interpreter cannot see, and
    inspect register use (`ptx`/`cubin` in `.asm`)."""
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    io = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[io_dtype]
    block_r, block_i, num_warps = _launch_config(R)
    consts = {"HAS_ZERO_INIT": has_zero_init, "BLOCK_I": block_i, "BLOCK_R": block_r}
    sig = {}
    for name in inspect.signature(_varlen_scan_kernel).parameters:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("q_ptr", "k_ptr", "v_ptr"):
            sig[name] = f"*{io}"
        elif name.endswith("_ptr"):
            sig[name] = {"slots_ptr": "*i32", "cu_ptr": "*i32", "ws_ptr": "*i64", "zi_ptr": "*u8"}.get(name, "*fp32")
        else:  # strides and R; pool strides as i64 (padded vLLM pages can be large)
            sig[name] = "i64" if name.startswith("sp") else "i32"
    src = ASTSource(fn=triton.jit(_varlen_scan_kernel), signature=sig, constexprs=consts)
    options = {"num_warps": num_warps, "enable_fp_fusion": True}
    return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)
