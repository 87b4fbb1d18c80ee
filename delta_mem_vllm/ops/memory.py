"""Δ-Mem math for one layer, shared by every engine: projections, gates, the memory step, corrections.

Everything that touches the state runs in fp32 (our decision); reads are cast to the model dtype
only where they enter a correction projection.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import DELTA_HEADS, DeltaMemConfig
from .scan import scan, update_coefficients

Tensor = torch.Tensor

# Parameter names exactly as the reference adapter file spells them.
CORE_PARAMS = ("memory_q_proj", "memory_k_proj", "memory_v_proj", "delta_q_proj", "delta_k_proj",
               "delta_v_proj", "delta_o_proj", "beta_proj", "beta_bias")


class DeltaMemLayer(nn.Module):
    """The trainable Δ-Mem parameters of one attention layer (never the state: that is per sequence)."""

    def __init__(self, config: DeltaMemConfig, hidden_size: int, q_out: int, k_out: int, v_out: int,
                 o_out: int) -> None:
        super().__init__()
        self.config = config
        D, G = config.state_read_dim, config.gate_dim
        empty = lambda *shape: nn.Parameter(torch.empty(*shape))  # noqa: E731
        self.memory_q_proj = empty(D, hidden_size)
        self.memory_k_proj = empty(D, hidden_size)
        self.memory_v_proj = empty(D, hidden_size)
        self.delta_q_proj = empty(q_out, D)
        self.delta_k_proj = empty(k_out, D)
        self.delta_v_proj = empty(v_out, D)
        self.delta_o_proj = empty(o_out, D)
        self.beta_proj = empty(G, hidden_size)
        self.beta_bias = empty(G)
        if not config.couple_lambda:
            self.lambda_proj = empty(G, hidden_size)
            self.lambda_bias = empty(G)
        if config.delta_o_rmsnorm:
            self.delta_o_rmsnorm_weight = empty(o_out)
        if config.trainable_delta_scale:
            self.delta_scale_raw = empty(4 if config.delta_scale_granularity == "head" else 1)
        # Inactive heads are kept (zero) because the adapter file carries them, but never trained.
        for head in DELTA_HEADS:
            if head not in config.delta_heads:
                getattr(self, f"delta_{head}_proj").requires_grad_(False)
        if config.delta_o_rmsnorm and "o" not in config.delta_heads:
            self.delta_o_rmsnorm_weight.requires_grad_(False)

    def param_names(self) -> list[str]:
        return [name for name, _ in self.named_parameters()]

    @torch.no_grad()
    def reset_parameters(self, base_weights: dict[str, Tensor] | None = None) -> None:
        """Reference initialisation; `base_weights` maps q/k/v/o to the base projections."""
        cfg = self.config
        for name in ("memory_q_proj", "memory_k_proj", "memory_v_proj"):
            nn.init.kaiming_uniform_(getattr(self, name), a=math.sqrt(5))
        for head in DELTA_HEADS:
            param = getattr(self, f"delta_{head}_proj")
            param.zero_()
            if head not in cfg.delta_heads or cfg.output_init == "zero":
                continue
            if cfg.output_init == "random":
                nn.init.kaiming_uniform_(param, a=math.sqrt(5))
                param.mul_(cfg.online_gain)
                continue
            if base_weights is None:
                raise ValueError(f"output_init={cfg.output_init!r} needs the base projection weights")
            base = base_weights[head]
            width = min(cfg.rank, base.shape[1])
            if cfg.output_init == "base_slice_fixed":
                width = min(width, cfg.base_slice_ref_width)
            cols = F.normalize(base[:, :width].float(), dim=0, eps=1e-6) * cfg.online_gain
            param[:, :width] = cols.to(param.dtype)
        self.beta_proj.zero_()
        self.beta_bias.fill_(cfg.beta_bias_init)
        if not cfg.couple_lambda:
            self.lambda_proj.zero_()
            self.lambda_bias.fill_(-cfg.beta_bias_init)
        if cfg.delta_o_rmsnorm:
            self.delta_o_rmsnorm_weight.fill_(1.0)
        if cfg.trainable_delta_scale:
            self.delta_scale_raw.fill_(cfg.delta_scale_raw_init())

    # --- per-token quantities -----------------------------------------------------------------
    def _cached(self, name: str, params: list[Tensor], build):
        """Derived inference-time tensors, rebuilt when a parameter changes (version counters) and
        computed fresh whenever autograd needs the graph."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return build()
        key = tuple((p.data_ptr(), p._version) for p in params)
        cache = self.__dict__.setdefault("_derived", {})
        if name not in cache or cache[name][0] != key:
            cache[name] = (key, build())
        return cache[name][1]

    def packed_input_projection(self) -> tuple[Tensor, Tensor]:
        """All input-side weights packed as one fp32 [3D + G (+G), H] matrix and its bias: one matmul
        per layer and token instead of three (layout: see `split_features`)."""
        names = ["memory_q_proj", "memory_k_proj", "memory_v_proj", "beta_proj"]
        biases = ["beta_bias"]
        if not self.config.couple_lambda:
            names.append("lambda_proj")
            biases.append("lambda_bias")
        params = [getattr(self, n) for n in names + biases]
        build = lambda: (torch.cat([getattr(self, n) for n in names]).float(),  # noqa: E731
                         torch.cat([torch.zeros(3 * self.config.state_read_dim, device=params[0].device)]
                                   + [getattr(self, b).float() for b in biases]))
        return self._cached("input", params, build)

    def features(self, x: Tensor) -> tuple[Tensor, ...]:
        """(q, k, v, keep, erase, write) of hidden states x [..., H], each fp32 [..., h, R]."""
        weight, bias = self.packed_input_projection()
        return split_features(F.linear(x.float(), weight, bias), self.config)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Memory query/key/value: tanh + L2 per state head on q/k, raw v (fp32 [..., h, R])."""
        return self.features(x)[:3]

    def coefficients(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-row (keep, erase, write) of the scan for one update mode (fp32 [..., h, R])."""
        return self.features(x)[3:]

    def head_scale(self, head: str) -> Tensor | float:
        """alpha/rank, times the bounded trainable multiplier when enabled."""
        cfg = self.config
        if not cfg.trainable_delta_scale:
            return cfg.scale
        idx = DELTA_HEADS.index(head) if cfg.delta_scale_granularity == "head" else 0
        return cfg.scale * torch.sigmoid(self.delta_scale_raw[idx].float()) * cfg.delta_scale_max

    def scaled_correction_t(self, head: str, dtype: torch.dtype) -> Tensor:
        """(α/R·μ_X·W_δX)ᵀ [D, out] in `dtype`: the scale folded into the weight, ready for addmm."""
        return (getattr(self, f"delta_{head}_proj") * self.head_scale(head)).t().to(dtype)

    def correction(self, head: str, reads: Tensor, out_dtype: torch.dtype) -> Tensor:
        """δX = (α/R)·μ_X·W_δX r for reads r [..., D]; δo optionally RMS-normalised in fp32."""
        weight = getattr(self, f"delta_{head}_proj")
        delta = F.linear(reads.to(weight.dtype), weight) * self.head_scale(head)
        if head == "o" and self.config.delta_o_rmsnorm:
            delta = rms_normalize(delta, self.delta_o_rmsnorm_weight, self.config.delta_o_rmsnorm_eps)
        return delta.to(out_dtype)

    def add_correction(self, head: str, output: Tensor, reads: Tensor) -> Tensor:
        """output + δX, fused into one addmm (scale folded into a cached weight) where possible."""
        if head == "o" and self.config.delta_o_rmsnorm:
            return output + self.correction(head, reads, output.dtype)
        weight = getattr(self, f"delta_{head}_proj")
        params = [weight] + ([self.delta_scale_raw] if self.config.trainable_delta_scale else [])
        scaled_t = self._cached(f"delta_{head}", params, lambda: self.scaled_correction_t(head, output.dtype))
        return add_scaled_reads(output, reads, scaled_t)

    # --- the memory step ------------------------------------------------------------------------
    def memory_step(self, x: Tensor, state: Tensor, valid: Tensor | None, writes: Tensor | None,
                    segment_ids: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Reads for every token and the new state, for a batch of rows.

        x [B,T,H]; state [B,h,R,R] fp32; valid/writes [B,T] bool (writes ⊆ valid; None = all);
        segment_ids [B,T] long (−1 = not written) switches to segment-mean writes.
        Returns reads [B,T,D] fp32 (zero on invalid tokens) and the new state [B,h,R,R] fp32.
        """
        cfg = self.config
        B, T, _ = x.shape
        h, R = cfg.num_state_heads, cfg.rank
        q, k, v, keep, erase, write = self.features(x)
        if segment_ids is not None:
            all_true = torch.ones(B, T, dtype=torch.bool, device=x.device)
            valid = all_true if valid is None else valid
            writes = valid if writes is None else writes
            if bool((writes & (segment_ids >= 0)).any()):
                return self._segment_step(x, q, state, writes, segment_ids, valid)
        # token writes (also the reference's fallback when a segment call has no usable ids)
        if h == 1:  # no head axis to fold into the batch: views only
            flat = lambda t: t.view(B, T, R)  # noqa: E731
            per_head = lambda m: m  # noqa: E731
        else:
            flat = lambda t: t.permute(0, 2, 1, 3).reshape(B * h, T, R)  # noqa: E731
            per_head = lambda m: None if m is None else m[:, None, :].expand(B, h, T).reshape(B * h, T)  # noqa: E731
        new_state, reads = scan(state.reshape(B * h, R, R), flat(q), flat(k), flat(v), flat(keep), flat(erase),
                                flat(write), per_head(valid), per_head(writes))
        if h > 1:
            reads = reads.view(B, h, T, R).permute(0, 2, 1, 3)
        return reads.reshape(B, T, h * R), new_state.view(B, h, R, R)

    def _segment_step(self, x: Tensor, q: Tensor, state: Tensor, writes: Tensor, segment_ids: Tensor,
                      valid: Tensor) -> tuple[Tensor, Tensor]:
        """Segment-mean writes: every token reads the state as it was at the start of the call."""
        cfg = self.config
        B, T, _ = x.shape
        h, R = cfg.num_state_heads, cfg.rank
        reads = torch.einsum("bhij,bthj->bthi", state.float(), q) * valid[:, :, None, None]
        active = writes & (segment_ids >= 0)
        num_segments = int(segment_ids[active].max().item()) + 1
        seg = torch.where(active, segment_ids, torch.full_like(segment_ids, num_segments))
        onehot = F.one_hot(seg, num_segments + 1)[..., :num_segments].float()          # [B,T,S]
        counts = onehot.sum(1)                                                             # [B,S]
        means = torch.einsum("bts,bth->bsh", onehot, x.float()) / counts.clamp_min(1)[..., None]
        means = means.to(x.dtype)
        sq, sk, sv, keep, erase, write = self.features(means)
        present = counts > 0
        flat = lambda t: t.permute(0, 2, 1, 3).reshape(B * h, num_segments, R)  # noqa: E731
        mask = present[:, None, :].expand(B, h, num_segments).reshape(B * h, num_segments)
        new_state, _ = scan(state.reshape(B * h, R, R), flat(sq), flat(sk), flat(sv), flat(keep), flat(erase),
                            flat(write), mask, mask)
        return reads.reshape(B, T, h * R), new_state.view(B, h, R, R)


def split_features(y: Tensor, config: DeltaMemConfig) -> tuple[Tensor, ...]:
    """(q, k, v, keep, erase, write), each fp32 [..., h, R], from the packed input projection
    y = x·[W_mq; W_mk; W_mv; W_β (; W_λ)]ᵀ + [0; 0; 0; b_β (; b_λ)].

    Pure tensor code with no Python branching on values, so it also runs inside compiled graphs.
    """
    cfg = config
    lead = y.shape[:-1]
    D, G, h, R = cfg.state_read_dim, cfg.gate_dim, cfg.num_state_heads, cfg.rank
    qk = y[..., :2 * D].reshape(*lead, 2, h, R)
    if cfg.normalize_qk:
        qk = F.normalize(torch.tanh(qk), dim=-1, eps=1e-6)
    q, k = qk.unbind(-3)
    v = y[..., 2 * D:3 * D].reshape(*lead, h, R)
    beta = torch.sigmoid(y[..., 3 * D:3 * D + G])
    lam = 1.0 - beta if cfg.couple_lambda else torch.sigmoid(y[..., 3 * D + G:])
    gate_shape = (*lead, h, R if cfg.rankwise_gates else 1)
    beta, lam = beta.reshape(gate_shape).expand(*lead, h, R), lam.reshape(gate_shape).expand(*lead, h, R)
    return (q, k, v, *update_coefficients(beta, lam, cfg.state_update_mode))


def rms_normalize(delta: Tensor, weight: Tensor, eps: float) -> Tensor:
    """The optional RMSNorm on δo, in fp32."""
    d = delta.float()
    return d * torch.rsqrt(d.pow(2).mean(-1, keepdim=True) + eps) * weight.float()


def add_scaled_reads(output: Tensor, reads: Tensor, scaled_t: Tensor) -> Tensor:
    """output + reads·scaled_t as one addmm over the flattened tokens (scaled_t from `scaled_correction_t`)."""
    flat = torch.addmm(output.reshape(-1, output.shape[-1]), reads.reshape(-1, reads.shape[-1]).to(output.dtype),
                       scaled_t)
    return flat.view(output.shape)
