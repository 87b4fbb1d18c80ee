"""The Δ-Mem KV connector: initialise every newly allocated state slot, and keep finished states.

vLLM never zeroes recurrent-state blocks, so a fresh slot holds whatever its last owner left. The
scheduler calls `update_state_after_alloc` for every request it moves from waiting to running — new
ones and preempted ones resumed from scratch alike — and we queue an init for each: the request's
initial state (or zeros) and its write start. When a request that asked for its state finishes we
queue a save with the number of tokens the state covers (`num_computed_tokens`, the engine's own
count) and keep the request's blocks: the hybrid allocator draws attention and state blocks from
one pool, and a state block handed to another request as an attention block would be zeroed before
any connector code runs. The worker copies the slot out at the start of the next step, before the
inits and the forward, and only then reports the request done so its blocks are freed. Saved states
wait in the worker's `Outbox` until the engine takes them (`worker_ext.DeltaMemWorkerExtension`).

Configure with `kv_connector="DeltaMemConnector"`, `kv_connector_module_path="delta_mem_vllm.vllm.connector"`,
`kv_role="kv_both"` (`launch.py` does).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch

from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                               KVConnectorRole, SupportsHMA)
from vllm.model_executor.models.utils import extract_layer_index

from .compat import mark_sync_loads, slot_views
from .lifetime import exit_with_parent
from .protocol import STATE_LAYER_SUFFIX, SavedState, SlotInit, SlotSave, TurnParams, TurnParamsError

log = logging.getLogger("deltamem.vllm.connector")


@dataclass
class DeltaMemConnectorMetadata(KVConnectorMetadata):
    saves: list[SlotSave] = field(default_factory=list)
    inits: list[SlotInit] = field(default_factory=list)


class Outbox:
    """Finished requests' states (on the host), by key, until taken; entries nobody takes expire.

    The engine takes a state within seconds, or gives up on it after STATE_TIMEOUT (60 s); an
    entry older than twice that has no reader left."""

    def __init__(self, ttl: float = 120.0, capacity: int = 65536) -> None:
        self.ttl, self.capacity = ttl, capacity
        self._items: OrderedDict[str, SavedState] = OrderedDict()
        self.expired = 0

    def put(self, key: str, saved: SavedState) -> None:
        saved.created = time.monotonic()
        self._items[key] = saved
        self._items.move_to_end(key)
        cutoff = saved.created - self.ttl
        while self._items and (len(self._items) > self.capacity or next(iter(self._items.values())).created < cutoff):
            self._items.popitem(last=False)
            self.expired += 1

    def take(self, key: str) -> SavedState | None:
        return self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)


def deltamem_group_ids(kv_cache_config: Any) -> list[int]:
    """Indices of the KV-cache groups made of Δ-Mem state layers (each gives a request one slot)."""
    if kv_cache_config is None:
        return []
    return [i for i, group in enumerate(kv_cache_config.kv_cache_groups)
            if any(name.endswith(STATE_LAYER_SUFFIX) for name in group.layer_names)]


class DeltaMemConnector(KVConnectorBase_V1, SupportsHMA):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None) -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        exit_with_parent()
        self._groups = deltamem_group_ids(kv_cache_config)
        if kv_cache_config is not None and not self._groups:
            raise ValueError("DeltaMemConnector: the model has no Δ-Mem state layers (is it a Δ-Mem model class?)")
        # scheduler side: work queued for the next step
        self._inits: list[SlotInit] = []
        self._saves: list[SlotSave] = []
        # worker side: the state layers in state-row order, each with the position of its group
        self._layers: list[tuple[Any, int]] = []
        self.outbox = Outbox()
        self.slot_inits = self.slot_saves = 0     # worker-side counters (more inits than requests: preemption)
        self.slots_used: set[int] = set()
        self._copied: set[str] = set()            # saved this step: their blocks may be freed now

    @property
    def requires_kv_delivery(self) -> bool:
        return False   # slots are copied out before they are freed: nothing to deliver later

    # --- scheduler side -----------------------------------------------------------------------------
    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        return 0, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if request.num_computed_tokens != 0:
            return   # not a fresh start (only streaming-input sessions keep their slot)
        params = self._params(request)
        block_ids = blocks.get_block_ids()
        slots = tuple(block_ids[g][0] for g in self._groups)
        self._inits.append(SlotInit(request.request_id, slots, params.write_start, params.state, params.state_shape))

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        return False, None   # never called: the connector supports the hybrid allocator

    def request_finished_all_groups(self, request: Any,
                                    block_ids: tuple[list[int], ...]) -> tuple[bool, dict[str, Any] | None]:
        params = self._params(request)
        if params.save_key is None:   # still say how many tokens the request's state took in
            return False, {"deltamem_num_tokens": min(request.num_computed_tokens, request.num_tokens)}
        slots = tuple(block_ids[g][0] for g in self._groups) if all(block_ids[g] for g in self._groups) else None
        covered = min(request.num_computed_tokens, request.num_tokens) if slots is not None else 0
        self._saves.append(SlotSave(params.save_key, request.request_id, slots, covered))
        # hold the blocks until the worker has copied the slot (it reports it in get_finished)
        return slots is not None, {"deltamem_num_tokens": covered}

    def build_connector_meta(self, scheduler_output: Any) -> DeltaMemConnectorMetadata:
        meta = DeltaMemConnectorMetadata(saves=self._saves, inits=self._inits)
        self._saves, self._inits = [], []
        if meta.saves or meta.inits:
            mark_sync_loads(scheduler_output)
        return meta

    @staticmethod
    def _params(request: Any) -> TurnParams:
        try:
            return TurnParams.from_kv_transfer_params(request.kv_transfer_params)
        except TurnParamsError as exc:   # never let one request's bad parameters stop the engine
            log.error("request %s: ignoring invalid Δ-Mem parameters (%s); zero state, all tokens written",
                      request.request_id, exc)
            return TurnParams()

    # --- worker side --------------------------------------------------------------------------------
    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        context = self._vllm_config.compilation_config.static_forward_context
        groups = self._kv_cache_config.kv_cache_groups
        named = [(name, pos) for pos, g in enumerate(self._groups) for name in groups[g].layer_names]
        named.sort(key=lambda item: extract_layer_index(item[0]))
        self._layers = [(context[name], pos) for name, pos in named]

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, DeltaMemConnectorMetadata):
            return
        if meta.saves:
            self._run_saves(meta.saves)
        if meta.inits:
            self._run_inits(meta.inits)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Requests whose slots were copied out this step: the scheduler frees their blocks now."""
        copied, self._copied = self._copied, set()
        return copied or None, None

    # the slot work all happens in start_load_kv, before the forward: nothing per layer, nothing after
    def wait_for_layer_load(self, layer_name: str) -> None:
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        return None

    def wait_for_save(self) -> None:
        return None

    def _pools(self) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        pools = []
        for layer, pos in self._layers:
            views = slot_views(layer)
            if views is None:
                raise RuntimeError(f"Δ-Mem state layer {layer.prefix} has no KV cache bound")
            pools.append((*views, pos))
        return pools

    @torch.no_grad()
    def _run_saves(self, saves: list[SlotSave]) -> None:
        self.slot_saves += len(saves)
        held = [s for s in saves if s.slots is not None]
        states: torch.Tensor | None = None
        if held:
            pools = self._pools()
            device = pools[0][1].device
            slots = torch.tensor([s.slots for s in held], dtype=torch.long, device=device)   # [n, groups]
            # on the host at once: a state waiting for its reader holds no device memory outside vLLM's budget
            states = torch.stack([pool[slots[:, pos]] for _, pool, pos in pools], dim=1).to("cpu")   # [n, L, h, R, R]
        row = 0
        for save in saves:
            state = None
            if save.slots is not None:
                state, row = states[row], row + 1
                self._copied.add(save.request_id)
            self.outbox.put(save.key, SavedState(state, save.num_tokens))

    @torch.no_grad()
    def _run_inits(self, inits: list[SlotInit]) -> None:
        self.slot_inits += len(inits)
        self.slots_used.update(slot for init in inits for slot in init.slots)
        pools = self._pools()
        ws_pool0, pool0, _ = pools[0]
        shape = (len(pools), *pool0.shape[1:])
        states = torch.zeros((len(inits), *shape), dtype=torch.float32)
        for i, init in enumerate(inits):
            if init.state is None:
                continue
            value = TurnParams(state=init.state, state_shape=init.state_shape).state_tensor()
            if tuple(value.shape) != shape:
                log.error("request %s: initial state has shape %s, the model's is %s; starting from zeros",
                          init.request_id, tuple(value.shape), shape)
                continue
            states[i] = value
        device = pool0.device
        states = states.to(device)
        slots = torch.tensor([init.slots for init in inits], dtype=torch.long, device=device)
        write_start = torch.tensor([init.write_start for init in inits], dtype=torch.int64, device=device)
        for row, (ws_pool, pool, pos) in enumerate(pools):
            pool[slots[:, pos]] = states[:, row]
            ws_pool[slots[:, pos], 0] = write_start
