"""Persistent tier backends: filesystem (embedded default), Redis (several replicas), memory (tests)."""

from .base import (
    ABSENT,
    PersistentBackend,
    Quota,
    QuotaExceeded,
    UsageLedger,
    VersionConflict,
    record_revision,
)
from .filesystem import FilesystemBackend
from .memory import MemoryBackend
from .redis import RedisBackend

__all__ = [
    "ABSENT",
    "FilesystemBackend",
    "MemoryBackend",
    "PersistentBackend",
    "Quota",
    "QuotaExceeded",
    "RedisBackend",
    "UsageLedger",
    "VersionConflict",
    "record_revision",
]
