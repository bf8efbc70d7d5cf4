"""Every failure the policy store reports on purpose is a ``PolicyStoreError``: callers catch that one."""

from __future__ import annotations


class PolicyStoreError(Exception):
    """Base class: a request the store refused, with a message fit to show an operator as is."""


class UnknownVersionError(PolicyStoreError, LookupError):
    """No policy version has that id."""


class UnknownAliasError(PolicyStoreError, LookupError):
    """No alias has that name."""


class NoPreviousVersionError(PolicyStoreError):
    """A rollback without ``to=`` found no earlier holder of the alias to go back to."""


class VersionNotReadyError(PolicyStoreError):
    """An alias may only point at a ``ready`` version (rejected/archived ones need ``force=True``)."""


class VersionInUseError(PolicyStoreError):
    """The version is held by an alias; move the alias first (or pass ``force=True``)."""


class StaleVerdictError(PolicyStoreError):
    """A canary verdict names alias holders that have moved since the analysis; nothing was changed."""


class AliasPinnedError(PolicyStoreError):
    """The alias is pinned (an operator's decision): no move until ``unpin``; nothing was changed."""


class LeaseLostError(PolicyStoreError):
    """The lease's epoch moved on (another holder took it over): writes fenced by the old one are refused."""


class InvalidWeightsError(PolicyStoreError, ValueError):
    """The directory to publish is not a safetensors HF model / PEFT adapter directory."""


class UnsafeWeightsError(InvalidWeightsError):
    """The directory holds pickle-capable weights (``*.bin``, ``*.pt``, ...): loading them can run code."""


class BlobError(PolicyStoreError):
    """Base class of blob storage failures."""


class DestinationNotEmptyError(BlobError):
    """A blob cannot be extracted into a directory that already holds files (another loader may have won)."""


class BlobMissingError(BlobError, FileNotFoundError):
    """The blob a version references is not on disk."""


class BlobIntegrityError(BlobError):
    """The blob's bytes do not hash to the digest recorded for the version: it must not be loaded."""
