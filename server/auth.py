"""Optional Bearer API keys. A key's owner id (a hash, never the key) scopes the sessions it creates."""

from __future__ import annotations

import hashlib
import hmac

from fastapi import Request

from server.errors import APIError

ANONYMOUS = ""


def owner_id(api_key: str) -> str:
    """Stable, non-reversible owner id of a key (stored in session records instead of the key)."""
    return "key-" + hashlib.sha256(api_key.encode()).hexdigest()[:24]


class Authenticator:
    """FastAPI dependency: returns the caller's owner id, or raises 401 when keys are on."""

    def __init__(self, api_keys: list[str]) -> None:
        self._keys = [k.encode() for k in api_keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def __call__(self, request: Request) -> str:
        if not self._keys:
            return ANONYMOUS
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        given = token.strip().encode()
        # compare against every key (no early exit) so timing does not reveal which one matched
        match = None
        for key in self._keys:
            if hmac.compare_digest(given, key):
                match = key
        if match is None:
            raise APIError(401, "incorrect API key provided", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        return owner_id(match.decode())
