"""The Δ-Mem affine scan: a naive per-token reference and a chunked torch form of one function.

For each independent state `S[n]` (n = sequence × state head, rows i = value index) and token t:

    read[n,t,i] = Σ_j S[n,i,j] q[n,t,j]                        (before the token's own write)
    S[n,i,:]   <- keep[n,t,i] S[n,i,:] − erase[n,t,i] (S[n,i,:]·k[n,t]) k[n,t] + write[n,t,i] v[n,t,i] k[n,t]

`valid[n,t]` false: the token neither reads (read = 0) nor writes. `writes[n,t]` false on a valid
token: it reads but leaves the state untouched (read-only prefixes, read-only turns).
All arithmetic is fp32 (our decision: the online state is fp32 in every engine).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def update_coefficients(beta: Tensor, lam: Tensor | None, mode: str) -> tuple[Tensor, Tensor, Tensor]:
    """Map the gates (β, λ) to the scan's per-row (keep, erase, write) for one update mode (§1.5)."""
    if mode == "standard":
        return lam, beta, beta
    if mode == "lambda_outside":
        return lam, lam * beta, beta
    if mode == "no_lambda":
        return torch.ones_like(beta), beta, beta
    raise ValueError(f"unknown state_update_mode {mode!r}")


def _effective_masks(valid: Tensor | None, writes: Tensor | None, shape: tuple[int, int], device) -> tuple[Tensor, Tensor]:
    v = torch.ones(shape, dtype=torch.bool, device=device) if valid is None else valid.to(torch.bool)
    w = v if writes is None else (v & writes.to(torch.bool))
    return v, w


def scan_reference(state0: Tensor, q: Tensor, k: Tensor, v: Tensor, keep: Tensor, erase: Tensor,
                   write: Tensor, valid: Tensor | None = None, writes: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Token-by-token loop, written to read like the formula. Shapes: state [N,R,R], others [N,T,R]."""
    N, T, R = q.shape
    valid, writes = _effective_masks(valid, writes, (N, T), q.device)
    S = state0.float().clone()
    q, k, v, keep, erase, write = (x.float() for x in (q, k, v, keep, erase, write))
    reads = torch.zeros(N, T, R, dtype=torch.float32, device=q.device)
    for t in range(T):
        read = torch.einsum("nij,nj->ni", S, q[:, t])
        reads[:, t] = read * valid[:, t, None]
        dot = torch.einsum("nij,nj->ni", S, k[:, t])
        new = (keep[:, t, :, None] * S
               - (erase[:, t] * dot)[:, :, None] * k[:, t, None, :]
               + (write[:, t] * v[:, t])[:, :, None] * k[:, t, None, :])
        S = torch.where(writes[:, t, None, None], new, S)
    return S, reads


def scan_chunked(state0: Tensor, q: Tensor, k: Tensor, v: Tensor, keep: Tensor, erase: Tensor,
                 write: Tensor, valid: Tensor | None = None, writes: Tensor | None = None,
                 chunk_size: int = 16) -> tuple[Tensor, Tensor]:
    """The same scan in chunks of C tokens, solved per chunk in closed form (a UT/WY-style transform).

    Per state row s (1×R): s_t = g_t s_{t−1} + c_t k_t with c_t = u_t − e_t (s_{t−1}·k_t),
    g = keep, e = erase, u = write·v. Inside a chunk the c_t solve a unit lower-triangular system
    (I + L) c = u − e ⊙ G_{t−1} (K s_0) that does not depend on s_0 except through a right-hand
    side linear in s_0; so every chunk's solve runs in parallel and only a cheap R×R affine map is
    carried sequentially from chunk to chunk. Decays are kept as ratios of cumulative log-gates,
    which are ≤ 1 whenever keep ≤ 1 (all sigmoid gates).
    """
    N, T, R = q.shape
    if T == 0:
        return state0.float().clone(), q.new_zeros(N, 0, R, dtype=torch.float32)
    valid, writes = _effective_masks(valid, writes, (N, T), q.device)
    f32 = torch.float32
    q, k, v, keep, erase, write = (x.to(f32) for x in (q, k, v, keep, erase, write))
    w = writes[..., None]
    g = torch.where(w, keep, torch.ones_like(keep))  # non-writing tokens are identity steps
    e = erase * w
    u = write * v * w

    C = max(1, min(chunk_size, T))
    pad = (-T) % C
    if pad:
        zpad = lambda x, val=0.0: torch.nn.functional.pad(x, (0, 0, 0, pad), value=val)  # noqa: E731
        q, k, e, u = zpad(q), zpad(k), zpad(e), zpad(u)
        g = zpad(g, 1.0)
    nc = (T + pad) // C
    # [N, nc, C, R] for token vectors; gates transposed to rows-first [N, nc, R(rows), C]
    qc, kc = q.view(N, nc, C, R), k.view(N, nc, C, R)
    gc, ec, uc = (x.view(N, nc, C, R).transpose(-1, -2) for x in (g, e, u))

    logg = torch.log(gc.clamp_min(torch.finfo(f32).tiny))
    cum = logg.cumsum(-1)                 # log G_t (inclusive)    [N,nc,R,C]
    cum_prev = cum - logg                 # log G_{t−1}
    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)
    # decay[t, j] = G_{t−1}/G_j for j < t
    decay = torch.exp((cum_prev[..., :, None] - cum[..., None, :]).masked_fill(~strict, float("-inf")))
    kk = kc @ kc.transpose(-1, -2)        # k_t·k_j     [N,nc,C,C]
    qk = qc @ kc.transpose(-1, -2)        # q_t·k_j
    lower = ec[..., :, None] * decay * kk[:, :, None]                        # [N,nc,R,C,C]
    eye = torch.eye(C, dtype=f32, device=q.device)
    g_prev = torch.exp(cum_prev)                                             # [N,nc,R,C]
    rhs = torch.cat([uc[..., None], (ec * g_prev)[..., None] * kc[:, :, None]], dim=-1)  # [N,nc,R,C,1+R]
    sol = torch.linalg.solve_triangular(eye + lower, rhs, upper=False, unitriangular=True)
    c_u, P = sol[..., 0], sol[..., 1:]    # c = c_u − P s0ᵀ                 [N,nc,R,C], [N,nc,R,C,R]

    # chunk-to-chunk map per state row: s_next = s0 @ (G_C·I − B) + b, one batched matmul per chunk
    tail = torch.exp(cum[..., -1:] - cum)                                    # G_C/G_j   [N,nc,R,C]
    b = (tail * c_u) @ kc                                                    # [N,nc,R,R]
    B = (tail[..., None] * P).transpose(-1, -2) @ kc[:, :, None]             # [N,nc,R,R(m),R(n)]
    step = torch.exp(cum[..., -1])[..., None, None] * torch.eye(R, dtype=f32, device=q.device) - B
    step = step.permute(1, 0, 2, 3, 4).reshape(nc, N * R, R, R).contiguous()
    b = b.permute(1, 0, 2, 3).reshape(nc, N * R, 1, R).contiguous()
    s = state0.to(f32).reshape(N * R, 1, R)
    starts = []
    for ci in range(nc):
        starts.append(s)
        s = torch.baddbmm(b[ci], s, step[ci])
    s0 = torch.stack(starts, dim=0).view(nc, N, R, R).transpose(0, 1)        # [N,nc,R,R]
    s = s.view(N, R, R)

    c = c_u - torch.einsum("nxicm,nxim->nxic", P, s0)                        # [N,nc,R,C]
    reads = g_prev * torch.einsum("nxim,nxtm->nxit", s0, qc)                 # G_{t−1} (s0·q_t)
    reads = reads + torch.einsum("nxitj,nxtj,nxij->nxit", decay, qk, c)      # Σ_{j<t} decay·(q_t·k_j)·c_j
    reads = reads.transpose(-1, -2).reshape(N, nc * C, R)[:, :T] * valid[..., None]
    return s, reads


def scan(state0: Tensor, q: Tensor, k: Tensor, v: Tensor, keep: Tensor, erase: Tensor, write: Tensor,
         valid: Tensor | None = None, writes: Tensor | None = None, impl: str = "auto") -> tuple[Tensor, Tensor]:
    """Dense (non-varlen) scan used by the embedded engine: the loop for a few tokens, chunks beyond."""
    if impl == "auto" and q.shape[1] == 1:
        return _scan_one_token(state0, q, k, v, keep, erase, write, valid, writes)
    if impl == "reference" or (impl == "auto" and q.shape[1] <= 4):
        return scan_reference(state0, q, k, v, keep, erase, write, valid, writes)
    if impl not in ("auto", "chunked"):
        raise ValueError(f"unknown scan impl {impl!r}; expected auto, reference or chunked")
    return scan_chunked(state0, q, k, v, keep, erase, write, valid, writes)


def _scan_one_token(state0: Tensor, q: Tensor, k: Tensor, v: Tensor, keep: Tensor, erase: Tensor, write: Tensor,
                    valid: Tensor | None, writes: Tensor | None) -> tuple[Tensor, Tensor]:
    """The decode step (T = 1) with as few kernel launches as possible (a CPU pays ~10 µs for each):
    one bmm gives S·q and S·k, two fused multiply-adds the update."""
    S = state0.float()
    q0, k0, v0, keep0, erase0, write0 = (x[:, 0].float() for x in (q, k, v, keep, erase, write))
    read, dot = torch.bmm(S, torch.stack([q0, k0], dim=-1)).unbind(-1)     # S·q, S·k: [N,R] each
    coef = torch.addcmul(write0 * v0, erase0, dot, value=-1.0)              # write·v − erase·(S·k)
    new = torch.addcmul(keep0[:, :, None] * S, coef[:, :, None], k0[:, None, :])
    if writes is not None or valid is not None:
        w = writes[:, :1].bool() if valid is None else _effective_masks(valid, writes, (q.shape[0], 1), q.device)[1]
        new = torch.where(w[:, 0, None, None], new, S)
    if valid is not None:
        read = read * valid[:, :1].to(read.dtype)
    return new, read[:, None]
