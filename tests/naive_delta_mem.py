"""An independent, token-by-token Δ-Mem forward written from the method's equations.

It shares nothing with the library's math: it reuses only the backbone's own modules for the parts
Δ-Mem does not touch (embeddings, norms, MLP, rotary tables, LM head) and reads the Δ-Mem parameters
by their reference names. Attention is recomputed explicitly per token over a growing K/V list.
"""

from __future__ import annotations

import torch


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat([-b, a], dim=-1)


def _uses_rope(model, layer_idx: int) -> bool:
    no_rope = getattr(model.config, "no_rope_layers", None)
    return True if no_rope is None else bool(no_rope[layer_idx])


@torch.no_grad()
def naive_forward(model, params: dict[str, torch.Tensor], cfg, ids: list[int],
                  state: dict[int, torch.Tensor] | None = None, write_from: int = 0, write: bool = True):
    """One sequence, token by token. `params[f"{layer}.{name}"]` are the Δ-Mem tensors (fp32).

    Returns (logits [T,V], {layer: state [h,R,R]}). Tokens before `write_from` read but do not write.
    """
    base = model.model
    R, h = cfg.rank, cfg.num_state_heads
    D = R * h
    heads_per_row = R if cfg.rankwise_gates else 1
    L = len(base.layers)
    S = {i: (state[i].clone().double() if state is not None else torch.zeros(h, R, R, dtype=torch.float64))
         for i in range(L)}
    kv = {i: ([], []) for i in range(L)}
    logits = []
    for t, tok in enumerate(ids):
        hidden = base.embed_tokens(torch.tensor([[tok]]))
        pos = torch.tensor([[t]])
        cos, sin = base.rotary_emb(hidden, pos)
        cos, sin = cos[0, 0].double(), sin[0, 0].double()
        for i, dec in enumerate(base.layers):
            attn = dec.self_attn
            p = lambda n: params[f"{i}.{n}"].double()  # noqa: E731
            x = dec.input_layernorm(hidden)[0, 0].double()
            # memory projections: tanh + L2 per state head on q/k, raw v
            def proj(w):
                return (p(w) @ x).view(h, R)
            mq, mk, mv = proj("memory_q_proj"), proj("memory_k_proj"), proj("memory_v_proj")
            if cfg.normalize_qk:
                mq = torch.stack([torch.tanh(r) / max(torch.tanh(r).norm().item(), 1e-6) for r in mq])
                mk = torch.stack([torch.tanh(r) / max(torch.tanh(r).norm().item(), 1e-6) for r in mk])
            beta = torch.sigmoid(p("beta_proj") @ x + p("beta_bias"))
            lam = 1 - beta if cfg.couple_lambda else torch.sigmoid(p("lambda_proj") @ x + p("lambda_bias"))
            read = torch.zeros(h, R, dtype=torch.float64)
            for j in range(h):
                Sj = S[i][j]
                read[j] = Sj @ mq[j]                       # read before the write
                if write and t >= write_from:
                    new = Sj.clone()
                    for row in range(R):
                        g = j * heads_per_row + (row if cfg.rankwise_gates else 0)
                        b, lm = beta[g], lam[g]
                        srow = Sj[row]
                        dot = srow @ mk[j]
                        if cfg.state_update_mode == "standard":
                            new[row] = lm * srow + b * (mv[j, row] - dot) * mk[j]
                        elif cfg.state_update_mode == "lambda_outside":
                            new[row] = lm * (srow - b * dot * mk[j]) + b * mv[j, row] * mk[j]
                        else:  # no_lambda
                            new[row] = srow + b * (mv[j, row] - dot) * mk[j]
                    S[i][j] = new
            r = read.reshape(D)

            def mu(head):
                if not cfg.trainable_delta_scale:
                    return 1.0
                idx = "qkvo".index(head) if cfg.delta_scale_granularity == "head" else 0
                return torch.sigmoid(p("delta_scale_raw")[idx]) * cfg.delta_scale_max

            def delta(head):
                if head not in cfg.delta_heads:
                    return 0.0
                return (p(f"delta_{head}_proj") @ r) * (cfg.alpha / cfg.rank) * mu(head)

            def lin(mod, v):
                out = mod.weight.double() @ v
                return out + mod.bias.double() if mod.bias is not None else out

            d = attn.head_dim
            Q = (lin(attn.q_proj, x) + delta("q")).view(-1, d)
            K = (lin(attn.k_proj, x) + delta("k")).view(-1, d)
            V = (lin(attn.v_proj, x) + delta("v")).view(-1, d)
            if getattr(attn, "q_norm", None) is not None:
                Q = attn.q_norm(Q.float()).double()
                K = attn.k_norm(K.float()).double()
            if _uses_rope(model, i):
                Q = Q * cos + _rotate_half(Q) * sin
                K = K * cos + _rotate_half(K) * sin
            kv[i][0].append(K)
            kv[i][1].append(V)
            Ks, Vs = torch.stack(kv[i][0]), torch.stack(kv[i][1])        # [t+1, n_kv, d]
            group = Q.shape[0] // Ks.shape[1]
            heads = []
            for qh in range(Q.shape[0]):
                kh = qh // group
                w = torch.softmax((Ks[:, kh] @ Q[qh]) * attn.scaling, dim=0)
                heads.append(w @ Vs[:, kh])
            o = lin(attn.o_proj, torch.cat(heads))
            if "o" in cfg.delta_heads:
                do = delta("o")
                if cfg.delta_o_rmsnorm:
                    do = do / torch.sqrt(do.pow(2).mean() + cfg.delta_o_rmsnorm_eps) * p("delta_o_rmsnorm_weight")
                o = o + do
            hidden = hidden + o.float().view(1, 1, -1)
            hidden = hidden + dec.mlp(dec.post_attention_layernorm(hidden))
        logits.append(model.lm_head(base.norm(hidden))[0, 0])
    return torch.stack(logits), {i: S[i].float() for i in S}


def layer_params(dm) -> dict[str, torch.Tensor]:
    """The DeltaMemModel's Δ-Mem tensors keyed `<layer index>.<reference name>`."""
    return {f"{i}.{n}": t.detach().float() for i, layer in enumerate(dm.layers) for n, t in layer.named_parameters()}

