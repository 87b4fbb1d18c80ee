"""Stored Responses API responses (`store: true`): what `GET /v1/responses/{id}` returns and where a
`previous_response_id` continues (its session). Small JSON documents attached to their session's
state in the session store, named by a hash of (owner, id) so that ids never become paths or keys.

A document is written before the turn that produced it commits and removed if that commit is known
to have failed, so a session never names a response that cannot be read. It is deleted with its
session (in the same step: it lives and expires with it), counts against the owner's storage
quota, and belongs to one incarnation of the session: a deleted id used again does not bring it back.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable

from delta_mem_vllm.state import Quota, TieredStateStore, storage_key

_DOMAIN = "delta-mem-response-v1"


def document_key(owner: str, response_id: str) -> str:
    payload = json.dumps([_DOMAIN, owner, response_id], ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode("ascii")).hexdigest()


class ResponseStore:
    """Response documents per owner: {"response": <object>, "session_id", "incarnation", "input_items",
    "written"}."""

    def __init__(self, store: TieredStateStore, quota: Callable[[str], Quota]) -> None:
        self._store = store
        self._quota = quota

    def put(self, owner: str, response_id: str, document: dict[str, Any]) -> None:
        """Attach the document to its session (VersionConflict when the session is gone; QuotaExceeded)."""
        blob = json.dumps(document, ensure_ascii=False).encode()
        self._store.put_document(storage_key(owner, document["session_id"]), document_key(owner, response_id),
                                 blob, self._quota(owner))

    def get(self, owner: str, response_id: str) -> dict[str, Any] | None:
        blob = self._store.get_document(document_key(owner, response_id))
        return None if blob is None else json.loads(blob)

    def delete(self, owner: str, response_id: str, session_id: str) -> bool:
        return self._store.delete_document(storage_key(owner, session_id), document_key(owner, response_id))
