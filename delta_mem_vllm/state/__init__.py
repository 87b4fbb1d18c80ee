"""Session-state persistence: the safetensors + JSON-manifest format, storage keys,
persistent backends (filesystem, Redis, memory) and the device → host → backend tiered store.

Framework-free (torch + safetensors; redis-py only for RedisBackend), so it is testable on a CPU.
"""

from .backends import (
    ABSENT,
    FilesystemBackend,
    MemoryBackend,
    PersistentBackend,
    Quota,
    QuotaExceeded,
    RedisBackend,
    VersionConflict,
    record_revision,
)
from .format import (
    FORMAT_VERSION,
    Snapshot,
    StateFormatError,
    StateMismatchError,
    decode_snapshot,
    encode_snapshot,
    export_document,
    import_document,
)
from .keys import SESSION_ID_PATTERN, quota_group, storage_key, validate_session_id, validate_storage_key
from .store import CommitUnknown, PersistError, TieredStateStore

__all__ = [
    "ABSENT",
    "CommitUnknown",
    "FORMAT_VERSION",
    "SESSION_ID_PATTERN",
    "FilesystemBackend",
    "MemoryBackend",
    "PersistError",
    "PersistentBackend",
    "Quota",
    "QuotaExceeded",
    "RedisBackend",
    "Snapshot",
    "StateFormatError",
    "StateMismatchError",
    "TieredStateStore",
    "VersionConflict",
    "decode_snapshot",
    "encode_snapshot",
    "export_document",
    "import_document",
    "quota_group",
    "record_revision",
    "storage_key",
    "validate_session_id",
    "validate_storage_key",
]
