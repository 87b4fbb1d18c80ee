"""Worker extension (`worker_extension_cls`): the engine's access to the states finished requests left.

Reached with `collective_rpc`, between engine steps. Every tensor-parallel rank holds the same
replicated state, so callers read rank 0's answer; every rank drops its copy.
"""

from __future__ import annotations

from typing import Any


def _connector() -> Any:
    from vllm.distributed.kv_transfer import get_kv_transfer_group, has_kv_transfer_group

    from .connector import DeltaMemConnector

    connector = get_kv_transfer_group() if has_kv_transfer_group() else None
    if not isinstance(connector, DeltaMemConnector):
        raise RuntimeError("the Δ-Mem connector is not configured on this worker")
    return connector


class DeltaMemWorkerExtension:
    def deltamem_take(self, keys: list[str]) -> dict[str, dict[str, Any]]:
        """Export and forget the saved states of these keys; keys not saved yet are left out
        (the save runs in the step after the request finished: ask again)."""
        outbox = _connector().outbox
        found = {}
        for key in keys:
            saved = outbox.take(key)
            if saved is not None:
                found[key] = saved.to_wire()
        return found

    def deltamem_drop(self, keys: list[str]) -> int:
        """Forget saved states nobody will take (aborted requests); returns how many were held."""
        outbox = _connector().outbox
        return sum(outbox.take(key) is not None for key in keys)

    def deltamem_stats(self) -> dict[str, int]:
        """Counters: states waiting in the outbox or expired there, slot initialisations (more than
        requests means preemptions), saves, and distinct slots used (fewer than inits: slot reuse)."""
        connector = _connector()
        return {"outbox": len(connector.outbox), "outbox_expired": connector.outbox.expired,
                "slot_inits": connector.slot_inits, "slot_saves": connector.slot_saves,
                "slots_used": len(connector.slots_used)}
