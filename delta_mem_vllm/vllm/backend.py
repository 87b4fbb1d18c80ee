"""The Δ-Mem state layers' attention backend: per step, which slot each request's state lives in.

vLLM builds this metadata once per step for all Δ-Mem layers (one KV-cache group) and hands the same
object to every layer. Decode batches can run in full CUDA graphs, so every tensor a graph reads is
a view of a persistent buffer (the runner's `query_start_loc`/`seq_lens`, our `_slots` buffer) and
padded rows point at NULL_BLOCK_ID with no tokens, which the scan leaves untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from vllm.v1.attention.backend import (AttentionBackend, AttentionCGSupport, AttentionMetadataBuilder,
                                       CommonAttentionMetadata)
from vllm.v1.attention.backends.utils import NULL_BLOCK_ID, mamba_get_block_table_tensor
from vllm.v1.kv_cache_interface import MambaSpec


@dataclass
class DeltaMemMetadata:
    num_reqs: int
    num_actual_tokens: int
    query_start_loc: torch.Tensor        # [num_reqs + 1]
    max_query_len: int                   # 1 in a pure decode step
    seq_lens: torch.Tensor               # [num_reqs], tokens computed once this step is done
    slots: torch.Tensor                  # [num_reqs] state slot of each request (int64)
    slots_initialised: bool              # a connector fills every new slot (state + write start)
    # filled by the first Δ-Mem layer of the step, shared by the others (same object for all layers)
    write_start: torch.Tensor | None = None
    zero_init: torch.Tensor | None = None

    def chunk_write_starts(self, write_start_pool: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per request, the first written token of this step's chunk, relative to the chunk, and
        which requests start from zeros. A connector stores each slot's absolute write start in the
        slot; without one every token writes and a request's first chunk starts from zeros."""
        if self.write_start is None:
            n = self.num_reqs
            qsl = self.query_start_loc[:n + 1]
            context = self.seq_lens[:n] - (qsl[1:] - qsl[:-1])
            if self.slots_initialised:
                absolute = write_start_pool[self.slots, 0]
                self.write_start = (absolute - context).clamp_min(0)
            else:
                self.write_start = torch.zeros_like(context)
                self.zero_init = context == 0
        return self.write_start, self.zero_init


class DeltaMemBackend(AttentionBackend):
    @staticmethod
    def get_name() -> str:
        return "DELTAMEM_STATE"

    @staticmethod
    def get_builder_cls() -> type["DeltaMemMetadataBuilder"]:
        return DeltaMemMetadataBuilder

    @classmethod
    def is_ssm(cls) -> bool:
        return True


class DeltaMemMetadataBuilder(AttentionMetadataBuilder[DeltaMemMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_SINGLE_TOKEN_DECODE
    reorder_batch_threshold: int = 1

    def __init__(self, kv_cache_spec: MambaSpec, layer_names: list[str], vllm_config, device: torch.device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if vllm_config.speculative_config is not None:
            raise ValueError("Δ-Mem models do not support speculative decoding")
        self.slots_initialised = _has_deltamem_connector(vllm_config)
        # room for every row a CUDA graph may be padded to, not just max_num_seqs
        rows = max(vllm_config.scheduler_config.max_num_seqs,
                   vllm_config.compilation_config.max_cudagraph_capture_size or 0)
        self._slots = torch.full((rows,), NULL_BLOCK_ID, dtype=torch.int64, device=device)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False, **kwargs) -> DeltaMemMetadata:
        cam = common_attn_metadata
        n = cam.num_reqs
        slots = mamba_get_block_table_tensor(cam.block_table_tensor, cam.seq_lens, self.kv_cache_spec,
                                             self.vllm_config.cache_config.mamba_cache_mode)[:n, 0]
        buf = self._slots[:n]
        buf.copy_(slots, non_blocking=True)
        return DeltaMemMetadata(num_reqs=n, num_actual_tokens=cam.num_actual_tokens, max_query_len=cam.max_query_len,
                                query_start_loc=cam.query_start_loc, seq_lens=cam.seq_lens, slots=buf,
                                slots_initialised=self.slots_initialised)

    def build_for_cudagraph_capture(self, common_attn_metadata: CommonAttentionMetadata) -> DeltaMemMetadata:
        meta = self.build(0, common_attn_metadata)
        # capture with NULL slots: the graph records addresses, not the slots it was captured with
        meta.slots.fill_(NULL_BLOCK_ID)
        return meta


def _has_deltamem_connector(vllm_config) -> bool:
    kv = vllm_config.kv_transfer_config
    return kv is not None and (kv.kv_connector_module_path or "").startswith("delta_mem_vllm.")
