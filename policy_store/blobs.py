"""Content-addressed storage of policy weights directories.

Format: one blob per version, an **uncompressed, canonical tar** of the directory.

- One file per version means one digest to verify, one ``os.replace`` to make it appear atomically, one file
  for gc to reason about, and ``tar tvf`` to inspect it by hand.
- Canonical: members in sorted path order, mtime 0, uid/gid 0, mode 0644/0755, no owner names, so the same
  directory content always yields the same bytes and so the same sha256 — which is what makes identical
  publishes deduplicate, and lets a checked-out directory be verified by re-deriving its tar stream.
- Uncompressed: safetensors weights do not compress usefully and compression would cost more CPU than
  the disk it saves; an uncompressed stream also hashes and extracts in one sequential pass.
- A manifest with per-file blobs would deduplicate tokenizer/config files across versions, but those are
  kilobytes next to weights that change at every DPO step, at the price of N files to write, verify and gc.

Layout: ``<blob_dir>/sha256/ab/cdef…`` (the 62 hex digits after the first two),
``<blob_dir>/checkout/<digest>`` for verified extracted copies, and ``.tmp-*`` files/directories next to
their destinations while being written.

Only safetensors weights are accepted: pickle-capable formats (``*.bin``, ``*.pt``, ...) run code on load.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from policy_store.errors import (
    BlobIntegrityError,
    BlobMissingError,
    DestinationNotEmptyError,
    InvalidWeightsError,
    PolicyStoreError,
    UnsafeWeightsError,
)

CHUNK = 1 << 20  # 1 MiB reads/writes: large enough that Python overhead vanishes next to I/O and hashing.
TMP_PREFIX = ".tmp-"

# Formats that can carry pickles (arbitrary code on load) or are simply not safetensors weights.
FORBIDDEN_SUFFIXES = frozenset(
    {".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz", ".h5", ".msgpack"}
    | {".gguf", ".onnx"}
)
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the format's own limit


@dataclass(frozen=True, slots=True)
class BlobRef:
    digest: str
    uri: str  # relative to the blob directory, so the directory can move
    size_bytes: int
    deduplicated: bool


# ----------------------------------------------------------------------------------------------- hashing I/O


class _HashingWriter:
    """A write-only file object that hashes what passes through (and writes it on, if given a file)."""

    def __init__(self, sink: BinaryIO | None = None, on_write: Callable[[int], None] | None = None) -> None:
        self._sink = sink
        self._hash = hashlib.sha256()
        self.size = 0
        self._on_write = on_write

    def write(self, data: bytes | memoryview) -> int:
        self._hash.update(data)
        self.size += len(data)
        if self._sink is not None:
            self._sink.write(data)
        if self._on_write is not None:
            self._on_write(self.size)
        return len(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


class _HashingReader:
    """A read-only file object that hashes every byte read, so extraction and verification are one pass."""

    def __init__(self, source: BinaryIO) -> None:
        self._source = source
        self._hash = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._source.read(size)
        self._hash.update(data)
        return data

    def drain(self) -> None:
        # The tar reader stops at the end-of-archive marker; the record padding after it is hashed too.
        while self.read(CHUNK):
            pass

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


# --------------------------------------------------------------------------------------- directory contents


def _entries(root: Path) -> Iterator[tuple[str, Path, bool]]:
    """``(relative posix path, path, is_dir)`` in canonical order: sorted by name, a directory before its
    contents. File symlinks are followed (HF cache snapshots are symlink farms); other specials are
    refused."""

    def walk(directory: Path, prefix: str) -> Iterator[tuple[str, Path, bool]]:
        for entry in sorted(os.scandir(directory), key=lambda e: e.name):
            rel = f"{prefix}{entry.name}"
            path = Path(entry.path)
            if entry.is_symlink() and path.is_dir():
                raise InvalidWeightsError(f"{path}: symlinked directories are not stored; copy it in")
            if entry.is_dir(follow_symlinks=False):
                yield rel, path, True
                yield from walk(path, rel + "/")
            elif entry.is_file(follow_symlinks=True):
                yield rel, path, False
            else:
                raise InvalidWeightsError(f"{path}: not a regular file or directory")

    return walk(root, "")


def _write_canonical_tar(root: Path, out: _HashingWriter) -> None:
    """Write ``root`` as a canonical tar to ``out`` (a blob file, or just a hash).

    Headers come from ``tarfile.TarInfo.tobuf`` and the end-of-archive marker and record padding match
    ``tarfile``'s, so the result is an ordinary tar; but file contents go straight from ``readinto`` into one
    reused buffer and on to ``out``, instead of through ``tarfile``'s stream buffer, which copied each
    chunk several times and made publishing a 0.5 GB model about twice as slow.
    """
    buffer = memoryview(bytearray(CHUNK))
    for rel, path, is_dir in _entries(root):
        info = tarfile.TarInfo(rel)
        info.mtime = 0
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.type, info.mode = (tarfile.DIRTYPE, 0o755) if is_dir else (tarfile.REGTYPE, 0o644)
        if is_dir:
            out.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
            continue
        with path.open("rb") as f:
            info.size = os.fstat(f.fileno()).st_size
            out.write(info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"))
            remaining = info.size
            while remaining:
                n = f.readinto(buffer[: min(CHUNK, remaining)])
                if not n:
                    raise InvalidWeightsError(f"{path} shrank while it was being stored")
                out.write(buffer[:n])
                remaining -= n
        out.write(bytes(-info.size % tarfile.BLOCKSIZE))
    out.write(bytes(2 * tarfile.BLOCKSIZE))
    out.write(bytes(-out.size % tarfile.RECORDSIZE))


def digest_dir(root: Path) -> str:
    """The sha256 the directory would have as a blob (used to verify an extracted checkout in place)."""
    sink = _HashingWriter()
    _write_canonical_tar(Path(root), sink)
    return sink.hexdigest()


# ------------------------------------------------------------------------------------------------ validation


def _looks_like_pickle_or_zip(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(4)
    # Pickle protocol 2+ starts with PROTO (0x80) and the protocol number; torch.save writes a zip archive.
    return (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5) or head == b"PK\x03\x04"


def _check_safetensors(path: Path) -> None:
    """Structural check from the header alone: length prefix, JSON header, data extent equal to file size."""
    size = path.stat().st_size
    with path.open("rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise InvalidWeightsError(f"{path}: too short to be a safetensors file")
        header_len = int.from_bytes(prefix, "little")
        if header_len > min(MAX_SAFETENSORS_HEADER, size - 8):
            raise InvalidWeightsError(f"{path}: not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(header_len))
        except ValueError as exc:
            raise InvalidWeightsError(f"{path}: not a safetensors file (header is not JSON)") from exc
    if not isinstance(header, dict):
        raise InvalidWeightsError(f"{path}: not a safetensors file (header is not an object)")
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise InvalidWeightsError(f"{path}: not a safetensors file (bad tensor entry)") from exc
    if 8 + header_len + end != size:
        raise InvalidWeightsError(
            f"{path}: safetensors data extent does not match the file size (truncated?)"
        )


def validate_weights_dir(root: Path, kind: str) -> None:
    """Refuse anything but a safetensors HF model (``full``) or PEFT adapter (``lora``) directory."""
    if not root.is_dir():
        raise InvalidWeightsError(f"{root}: not a directory")
    files = [(rel, path) for rel, path, is_dir in _entries(root) if not is_dir]
    unsafe = [rel for rel, path in files if Path(rel).suffix.lower() in FORBIDDEN_SUFFIXES]
    unsafe += [
        rel
        for rel, path in files
        if rel not in unsafe and not rel.endswith(".safetensors") and _looks_like_pickle_or_zip(path)
    ]
    if unsafe:
        raise UnsafeWeightsError(
            f"{root}: only safetensors weights are accepted; refusing pickle-capable/non-safetensors "
            f"file(s) {', '.join(sorted(unsafe))} (re-save with save_pretrained(safe_serialization=True))"
        )
    weights = [path for rel, path in files if rel.endswith(".safetensors")]
    for path in weights:
        _check_safetensors(path)
    names = {rel for rel, _ in files}
    required = ["config.json"] if kind == "full" else ["adapter_config.json", "adapter_model.safetensors"]
    missing = [name for name in required if name not in names]
    if missing:
        raise InvalidWeightsError(f"{root}: a {kind!r} version needs {', '.join(missing)}")
    if not weights:
        raise InvalidWeightsError(f"{root}: no *.safetensors weights found")


# ---------------------------------------------------------------------------------------------- filesystem


def _fsync_dir(path: Path) -> None:
    # Makes a rename durable: the new directory entry survives a power cut, not just the file's bytes.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _extract_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    # Defence in depth on read: the "data" filter refuses absolute paths, "..", links out of the tree and
    # device files; we additionally accept only plain files and directories, and never pickles.
    member = tarfile.data_filter(member, dest)
    if not (member.isreg() or member.isdir()):
        raise tarfile.FilterError(f"unexpected member type in policy blob: {member.name}")
    if Path(member.name).suffix.lower() in FORBIDDEN_SUFFIXES:
        raise tarfile.FilterError(f"pickle-capable file in policy blob: {member.name}")
    return member


def private_dir(path: Path) -> Path:
    """``path`` as a directory; the ones created here (and missing parents) are 0700, owner only: weights,
    checkouts and databases are nobody else's business whatever the umask. Existing ones are left alone."""
    missing = []
    current = Path(path)
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        directory.mkdir(mode=0o700, exist_ok=True)
        os.chmod(directory, 0o700)  # mkdir's mode is filtered through the umask
    return Path(path)


def private_file(path: Path) -> Path:
    """Create ``path`` empty with mode 0600 unless it exists (its parent directory private, as above)."""
    private_dir(Path(path).parent)
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    return Path(path)


class BlobStore:
    """Blobs under ``root``; safe for several processes at once (writes are whole-file renames)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.objects = self.root / "sha256"
        self.checkouts = self.root / "checkout"

    # ---- naming

    def relative_uri(self, digest: str) -> str:
        return f"sha256/{digest[:2]}/{digest[2:]}"

    def path_for(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise PolicyStoreError(f"not a sha256 hex digest: {digest!r}")
        return self.root / self.relative_uri(digest)

    def checkout_path(self, digest: str) -> Path:
        return self.checkouts / digest

    def exists(self, digest: str) -> bool:
        return self.path_for(digest).is_file()

    # ---- write

    def put_dir(self, src: Path, *, kind: str, on_write: Callable[[int], None] | None = None) -> BlobRef:
        """Validate ``src``, then store it as one blob: temp file, fsync, ``os.replace``. Identical content
        lands on the same path and is stored once. ``on_write(bytes so far)`` follows the write's progress."""
        src = Path(src)
        validate_weights_dir(src, kind)
        private_dir(self.objects)
        # The temp file sits in sha256/, the same file system as its destination, so the rename is atomic.
        fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, dir=self.objects)
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as f:
                writer = _HashingWriter(f, on_write)
                _write_canonical_tar(src, writer)
                f.flush()
                os.fsync(f.fileno())
            digest, size = writer.hexdigest(), writer.size
            final = self.path_for(digest)
            final.parent.mkdir(exist_ok=True)
            deduplicated = final.is_file() and final.stat().st_size == size
            if deduplicated:
                # Refresh the mtime: gc spares unreferenced blobs younger than its retention, and this one
                # is about to be referenced by the row the caller is going to insert.
                os.utime(final)
                tmp.unlink()
            else:
                os.chmod(tmp, 0o444)  # blobs are immutable; a read-only mode keeps careless tools off them
                os.replace(tmp, final)
                _fsync_dir(final.parent)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return BlobRef(
            digest=digest, uri=self.relative_uri(digest), size_bytes=size, deduplicated=deduplicated
        )

    def adopt_checkout(self, src: Path, digest: str) -> bool:
        """Make ``src``, a directory its owner gives away whose canonical tar hashed to ``digest``, the
        digest's checkout by renaming it: a later ``load_dir`` then re-verifies it in place (one hash)
        instead of extracting the blob (a hash and a full write). False, with ``src`` left where it is, when
        the checkout exists already or the rename is impossible (``src`` on another file system)."""
        dest = self.checkout_path(digest)
        if dest.exists():
            return False
        private_dir(self.checkouts)
        try:
            os.chmod(src, 0o700)  # what an extracted checkout gets
            # Atomic. Had a racing loader extracted the checkout meanwhile, the rename fails (its directory
            # is not empty) and that equally verified copy stays.
            os.rename(src, dest)
        except OSError:
            return False
        return True

    # ---- read

    def verify(self, digest: str, *, label: str = "") -> None:
        """Re-hash the blob; raise if it is missing or its bytes changed."""
        src = self._existing(digest, label)
        h = hashlib.sha256()
        with src.open("rb") as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        self._check_digest(digest, h.hexdigest(), label)

    def materialise(self, digest: str, dest_dir: Path, *, label: str = "") -> Path:
        """Extract the blob into ``dest_dir`` (absent or empty), verifying its sha256 on the way.

        Extraction goes to a temp directory beside ``dest_dir`` and is renamed into place only after the
        digest matched, so ``dest_dir`` never holds unverified or partial content. If another process
        materialised the same ``dest_dir`` first, its (equally verified) copy is kept.
        """
        src = self._existing(digest, label)
        dest = Path(dest_dir)
        if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
            raise DestinationNotEmptyError(
                f"cannot materialise {self._what(digest, label)} into {dest}: not empty"
            )
        private_dir(dest.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{dest.name}-", dir=dest.parent))
        try:
            self._extract_verified(src, digest, tmp, label)
            try:
                os.replace(tmp, dest)  # rename over an absent or empty directory is atomic on POSIX
            except OSError:
                if not (dest.is_dir() and any(dest.iterdir())):
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # a concurrent loader won the race
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return dest

    def _extract_verified(self, src: Path, digest: str, into: Path, label: str) -> None:
        with src.open("rb") as f:
            reader = _HashingReader(f)
            try:
                with tarfile.open(fileobj=reader, mode="r|", bufsize=CHUNK) as tar:  # type: ignore[call-overload]
                    tar.extractall(into, filter=_extract_filter)
                reader.drain()
            except (tarfile.TarError, EOFError, UnicodeDecodeError) as exc:
                raise BlobIntegrityError(
                    f"{self._what(digest, label)} is corrupt and cannot be unpacked ({exc}); "
                    "refusing to load it"
                ) from exc
        self._check_digest(digest, reader.hexdigest(), label)

    # ---- housekeeping

    def iter_blobs(self) -> Iterator[tuple[str, Path]]:
        """``(digest, path)`` of every stored blob."""
        if not self.objects.is_dir():
            return
        for sub in sorted(self.objects.iterdir()):
            if len(sub.name) != 2 or not sub.is_dir():
                continue
            for path in sorted(sub.iterdir()):
                if not path.name.startswith(TMP_PREFIX):
                    yield sub.name + path.name, path

    def iter_checkouts(self) -> Iterator[tuple[str, Path]]:
        if self.checkouts.is_dir():
            for path in sorted(self.checkouts.iterdir()):
                if not path.name.startswith(TMP_PREFIX):
                    yield path.name, path

    def iter_temp(self) -> Iterator[Path]:
        """Leftovers of interrupted writes/extractions."""
        for parent in (self.objects, self.checkouts):
            if parent.is_dir():
                yield from (p for p in sorted(parent.iterdir()) if p.name.startswith(TMP_PREFIX))

    @staticmethod
    def age_seconds(path: Path) -> float:
        return time.time() - path.stat().st_mtime

    @staticmethod
    def size_of(path: Path) -> int:
        if path.is_dir():
            return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        return path.stat().st_size

    @staticmethod
    def remove(path: Path) -> None:
        if path.exists() and not path.is_dir():
            # Read-only blobs: unlink needs write permission on the directory only, but be explicit.
            os.chmod(path, stat.S_IRUSR | stat.S_IWUSR)
        _remove(path)

    # ---- helpers

    @staticmethod
    def _what(digest: str, label: str) -> str:
        return f"blob sha256:{digest}" + (f" of {label}" if label else "")

    def _existing(self, digest: str, label: str) -> Path:
        src = self.path_for(digest)
        if not src.is_file():
            raise BlobMissingError(f"{self._what(digest, label)} is missing (expected at {src})")
        return src

    def _check_digest(self, expected: str, actual: str, label: str) -> None:
        if actual != expected:
            raise BlobIntegrityError(
                f"{self._what(expected, label)} failed verification: its bytes hash to sha256:{actual}; "
                "refusing to load it"
            )
