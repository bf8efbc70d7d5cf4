"""Versioned policy store: immutable versions, movable aliases, an append-only audit log, and
content-addressed safetensors blobs. See ``store.PolicyStore``."""

from policy_store.blobs import BlobStore, digest_dir, validate_weights_dir
from policy_store.entities import (
    ADAPTER_BASE_TAG,
    AliasRecord,
    AuditEntry,
    GcReport,
    PolicyVersion,
    version_tag,
)
from policy_store.errors import (
    AliasPinnedError,
    BlobError,
    BlobIntegrityError,
    BlobMissingError,
    InvalidWeightsError,
    LeaseLostError,
    NoPreviousVersionError,
    PolicyStoreError,
    StaleVerdictError,
    UnknownAliasError,
    UnknownVersionError,
    UnsafeWeightsError,
    VersionInUseError,
    VersionNotReadyError,
)
from policy_store.lease import Lease, Leases
from policy_store.store import PolicyStore

__all__ = [
    "ADAPTER_BASE_TAG",
    "AliasPinnedError",
    "AliasRecord",
    "AuditEntry",
    "BlobError",
    "BlobIntegrityError",
    "BlobMissingError",
    "BlobStore",
    "GcReport",
    "InvalidWeightsError",
    "Lease",
    "LeaseLostError",
    "Leases",
    "NoPreviousVersionError",
    "PolicyStore",
    "PolicyStoreError",
    "PolicyVersion",
    "StaleVerdictError",
    "UnknownAliasError",
    "UnknownVersionError",
    "UnsafeWeightsError",
    "VersionInUseError",
    "VersionNotReadyError",
    "digest_dir",
    "validate_weights_dir",
    "version_tag",
]
