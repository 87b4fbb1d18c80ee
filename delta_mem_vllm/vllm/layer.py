"""Δ-Mem inside one vLLM attention layer: the adapter's parameters, the recurrent-state layer, the scan op.

`DeltaMemAttentionMemory` is the project's `DeltaMemLayer` (same parameters, same math) plus what
serving needs: serving weights derived once after loading (packed input projection, the δq|δk|δv
correction laid out like this rank's shard of the packed qkv output, δo) and a `DeltaMemState`
child, the `MambaBase` layer that owns one fp32 [h, R, R] state slot per request in vLLM's KV cache.

The scan runs as the custom op `vllm::deltamem_scan`, registered as a splitting op so that piecewise
CUDA graphs run it eagerly with the step's metadata (inside a piecewise graph it would see no
metadata and silently read zeros). It calls `ops.varlen_scan`: the Triton kernel on a GPU, the
chunked torch scan on a CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vllm.config import get_current_vllm_config
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.utils.torch_utils import LayerNameType, _encode_layer_name, _resolve_layer_name, direct_register_custom_op
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from ..config import DeltaMemConfig
from ..ops.memory import DeltaMemLayer, add_scaled_reads, split_features
from ..ops.varlen import varlen_scan
from .backend import DeltaMemBackend, DeltaMemMetadata
from .compat import slot_views

SCAN_OP = "deltamem_scan"


class DeltaMemState(nn.Module, MambaBase):
    """Per-request Δ-Mem state of one layer. A slot's page holds the request's absolute write start
    (int64, first so that both views stay aligned for any R) and its fp32 [h, R, R] state, both
    written by the connector when the slot is allocated."""

    def __init__(self, num_heads: int, rank: int, prefix: str) -> None:
        nn.Module.__init__(self)
        self.num_heads, self.rank, self.prefix = num_heads, rank, prefix
        forward_context = get_current_vllm_config().compilation_config.static_forward_context
        if prefix in forward_context:
            raise ValueError(f"Duplicate layer name: {prefix}")
        forward_context[prefix] = self
        self.kv_cache = (torch.tensor([]), torch.tensor([]))
        self._op_name = _encode_layer_name(prefix)

    def get_state_shape(self) -> tuple[tuple[int, ...], ...]:
        return (1,), (self.num_heads, self.rank, self.rank)

    def get_state_dtype(self) -> tuple[torch.dtype, ...]:
        return torch.int64, torch.float32

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.CUSTOM

    @property
    def is_kv_cache_tp_replicated(self) -> bool:
        return True   # every tensor-parallel rank runs the same scan on the same replicated state

    def get_attn_backend(self) -> type[DeltaMemBackend]:
        return DeltaMemBackend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
                erase: torch.Tensor, write: torch.Tensor) -> torch.Tensor:
        """Reads [T, h, R] fp32 for the step's packed tokens; the slots are updated in place."""
        reads = q.new_zeros(q.shape, dtype=torch.float32)
        torch.ops.vllm.deltamem_scan(q, k, v, keep, erase, write, reads, self._op_name)
        return reads

    def scan(self, meta: DeltaMemMetadata, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor,
             erase: torch.Tensor, write: torch.Tensor, reads: torch.Tensor) -> None:
        views = slot_views(self)
        if views is None:   # profiling runs before the KV cache exists
            return
        write_start_pool, pool = views
        write_start, zero_init = meta.chunk_write_starts(write_start_pool)
        n = meta.num_actual_tokens
        if n < q.shape[0]:   # padded tokens (CUDA graphs): leave their reads zero
            q, k, v, keep, erase, write, reads = (t[:n] for t in (q, k, v, keep, erase, write, reads))
        varlen_scan(pool, meta.slots, meta.query_start_loc[:meta.num_reqs + 1], write_start, q, k, v, keep, erase,
                    write, zero_init, out=reads, max_len=meta.max_query_len)


def _deltamem_scan(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, erase: torch.Tensor,
                   write: torch.Tensor, reads: torch.Tensor, layer_name: LayerNameType) -> None:
    name = _resolve_layer_name(layer_name)
    context = get_forward_context()
    metadata = context.attn_metadata
    if metadata is None:   # dummy and profiling runs: no request, reads stay zero
        return
    if isinstance(metadata, list):
        raise NotImplementedError("Δ-Mem does not support micro-batching (dual batch overlap)")
    context.no_compile_layers[name].scan(metadata[name], q, k, v, keep, erase, write, reads)


def _deltamem_scan_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, keep: torch.Tensor, erase: torch.Tensor,
                        write: torch.Tensor, reads: torch.Tensor, layer_name: LayerNameType) -> None:
    return None


direct_register_custom_op(op_name=SCAN_OP, op_func=_deltamem_scan, mutates_args=["reads"],
                          fake_impl=_deltamem_scan_fake)


def qkv_shard_columns(qkv_proj: nn.Module) -> tuple[slice, slice]:
    """This tensor-parallel rank's rows of the full q and of the full k/v projections, exactly as
    vLLM's QKVParallelLinear shards its weight (KV heads replicated when there are fewer than ranks)."""
    head = qkv_proj.head_size
    q_local, kv_local = qkv_proj.num_heads * head, qkv_proj.num_kv_heads * head
    rank = getattr(qkv_proj, "tp_rank", 0)
    kv_shard = rank // getattr(qkv_proj, "num_kv_head_replicas", 1)
    return slice(rank * q_local, (rank + 1) * q_local), slice(kv_shard * kv_local, (kv_shard + 1) * kv_local)


class DeltaMemAttentionMemory(DeltaMemLayer):
    """The adapter's parameters for one attention layer (full, unsharded: they are tiny), the state
    layer, and the serving weights derived from them by `finalize()` after loading."""

    def __init__(self, config: DeltaMemConfig, *, hidden_size: int, q_out: int, kv_out: int,
                 qkv_proj: nn.Module, prefix: str) -> None:
        super().__init__(config, hidden_size, q_out, kv_out, kv_out, hidden_size)
        self.state = DeltaMemState(config.num_state_heads, config.rank, prefix=f"{prefix}.state")
        self._q_cols, self._kv_cols = qkv_shard_columns(qkv_proj)
        self.qkv_heads = tuple(h for h in ("q", "k", "v") if h in config.delta_heads)
        self.has_o = "o" in config.delta_heads
        for name in ("input_weight", "input_bias", "qkv_t", "o_t"):
            self.register_buffer(name, None, persistent=False)

    @torch.no_grad()
    def finalize(self, model_dtype: torch.dtype) -> None:
        """Derive the serving weights (scale folded in, qkv laid out as this rank's packed shard)."""
        self.input_weight, self.input_bias = (t.clone() for t in self.packed_input_projection())
        if self.qkv_heads:
            cols = {"q": self._q_cols, "k": self._kv_cols, "v": self._kv_cols}
            parts = []
            for head in ("q", "k", "v"):
                full = self.scaled_correction_t(head, model_dtype)
                parts.append(full[:, cols[head]] if head in self.qkv_heads else torch.zeros_like(full[:, cols[head]]))
            self.qkv_t = torch.cat(parts, dim=1).contiguous()
        if self.has_o and not self.config.delta_o_rmsnorm:
            self.o_t = self.scaled_correction_t("o", model_dtype).contiguous()

    def read(self, x: torch.Tensor) -> torch.Tensor:
        """Memory reads [T, D] fp32 of the step's tokens (each read before its own write)."""
        features = split_features(F.linear(x.float(), self.input_weight, self.input_bias), self.config)
        return self.state(*features).flatten(1)

    def correct_qkv(self, qkv: torch.Tensor, reads: torch.Tensor) -> torch.Tensor:
        return add_scaled_reads(qkv, reads, self.qkv_t) if self.qkv_t is not None else qkv

    def correct_o(self, output: torch.Tensor, reads: torch.Tensor) -> torch.Tensor:
        if not self.has_o:
            return output
        if self.o_t is not None:
            return add_scaled_reads(output, reads, self.o_t)
        return output + self.correction("o", reads, output.dtype)   # δo RMSNorm, in fp32
