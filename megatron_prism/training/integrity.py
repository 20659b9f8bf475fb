"""Checkpoint files that prove they are whole: every file is hashed (sha256) while it is written,
the digests go into ``COMPLETE.json``, and loading re-hashes what it reads.

Hashing while writing means a save never reads its own output back: ``torch.save`` and the JSON
files stream through :class:`HashingWriter`; a safetensors shard is serialised to bytes once
(``safetensors.torch.save``), hashed and written from that buffer. Small files copied into a
checkpoint (the HF config/tokenizer files) are hashed from disk.

Any failure to read a checkpoint file (a digest or size mismatch, a missing file, malformed JSON, a
torch archive that does not open) is a :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as safetensors_bytes

from megatron_prism.models.errors import CheckpointError

_CHUNK = 1 << 20


@dataclass(frozen=True)
class FileDigest:
    bytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {"bytes": self.bytes, "sha256": self.sha256}


class HashingWriter:
    """A binary file object that hashes and counts what passes through it."""

    def __init__(self, fh) -> None:
        self._fh, self._hash, self.count = fh, hashlib.sha256(), 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self._hash.update(view)
        self.count += len(view)
        return self._fh.write(view)

    def flush(self) -> None:
        self._fh.flush()

    def digest(self) -> FileDigest:
        return FileDigest(self.count, self._hash.hexdigest())


def _write_hashed(path: Path, write) -> FileDigest:
    with open(path, "wb") as fh:
        writer = HashingWriter(fh)
        write(writer)
        fh.flush()
        os.fsync(fh.fileno())
    return writer.digest()


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> FileDigest:
    data = safetensors_bytes(tensors, metadata=metadata)
    return _write_hashed(path, lambda w: w.write(data))


def write_torch(path: Path, obj: Any) -> FileDigest:
    return _write_hashed(path, lambda w: torch.save(obj, w))


def write_json(path: Path, obj: Any) -> FileDigest:
    data = json.dumps(obj, indent=1, sort_keys=True).encode()
    return _write_hashed(path, lambda w: w.write(data))


def file_digest(path: Path) -> FileDigest:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
            n += len(chunk)
    return FileDigest(n, h.hexdigest())


def tree_digests(root: Path, under: str = "", *, skip: frozenset[str] | set[str] = frozenset()) -> dict[str, FileDigest]:
    """Digests of every file below ``root/under``, keyed by their path relative to ``root``, but
    those named in ``skip`` (already hashed while written)."""
    base = root / under if under else root
    return {name: file_digest(p) for p in sorted(base.rglob("*"))
            if p.is_file() and (name := str(p.relative_to(root))) not in skip}


def state_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested state (an estimate of what saving it writes)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_bytes(v) for v in obj)
    return 0


def check_free_space(path: Path, needed: int) -> None:
    """Raise ENOSPC before writing when ``needed`` bytes (plus 5 %) will not fit at ``path``."""
    free = shutil.disk_usage(path).free
    if needed * 1.05 > free:
        raise OSError(errno.ENOSPC, f"needs about {needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB free on the "
                                    f"file system of {path}")


def read_json(path: Path) -> Any:
    """A checkpoint's JSON file, or a CheckpointError naming it."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}); the checkpoint is damaged") from None


def verify_digest(path: Path, expected: Any) -> None:
    """``expected`` is ``{"bytes", "sha256"}`` (or a bare size, as older checkpoints recorded)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete or damaged")
    size = expected if isinstance(expected, int) else expected["bytes"]
    got = path.stat().st_size
    if got != size:
        raise CheckpointError(f"{path}: {got} bytes, expected {size}; the file is truncated or damaged")
    if isinstance(expected, dict) and expected.get("sha256"):
        digest = file_digest(path)
        if digest.sha256 != expected["sha256"]:
            raise CheckpointError(f"{path}: sha256 {digest.sha256[:12]}.. differs from the recorded "
                                  f"{expected['sha256'][:12]}..; the file is damaged")


def load_torch_verified(path: Path, expected: Any) -> Any:
    """``torch.load(weights_only=True)`` of bytes that are hashed as they are read."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing; the checkpoint is incomplete or damaged")
    data = path.read_bytes()
    if isinstance(expected, dict) and expected.get("sha256"):
        got = hashlib.sha256(data).hexdigest()
        if got != expected["sha256"] or len(data) != expected["bytes"]:
            raise CheckpointError(f"{path}: sha256 {got[:12]}.. differs from the recorded "
                                  f"{expected['sha256'][:12]}..; the file is damaged")
    try:
        return torch.load(io.BytesIO(data), weights_only=True)
    except Exception as exc:  # noqa: BLE001 - zip/pickle errors of every kind: one line naming the file
        raise CheckpointError(f"{path}: cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                              "the file is damaged") from None
