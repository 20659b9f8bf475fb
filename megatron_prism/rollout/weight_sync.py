"""Streaming the policy's weights from the TP/PP-sharded megatron model to a rollout engine.

Every engine (embedded, SGLang, vLLM) loads Hugging Face-named *full* tensors, so the export is
shared: :func:`export_hf_weights` walks the one conversion map (``layout_maps``) in a fixed order,
gathers each parameter over its tensor-parallel group, turns the shards back into HF tensors with
:meth:`ParamMap.unshard` (undoing megatron's qkv / gate-up packing) and hands the tensors of the
pipeline stage that owns the parameter to the other stages. One parameter at a time, so a rank
never holds more than one full parameter beyond its own shards.

:func:`bucketize` groups the stream into buckets of bounded size (what an engine loads per call);
:class:`FlatBucket` packs a bucket into one contiguous buffer + metadata, the shape SGLang's
``flattened_bucket`` update path takes (one CUDA-IPC handle per bucket instead of one per tensor).
:func:`sync_weights` runs the colocated protocol (resume weights -> stream -> resume KV cache) and
reports how long it took; :func:`measure_export` times the export alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_prism.models.conversion.convert import layout_maps
from megatron_prism.models.conversion.mapping import expected_lm_shapes, expected_vision_shapes, global_name, place

DEFAULT_BUCKET_BYTES = 512 << 20
OUTPUT_LAYER = "language_model.output_layer.weight"
_ALIGN = 16  # bytes; FlatBucket offsets of a mixed-dtype buffer are aligned so every dtype can be viewed

NamedTensor = tuple[str, torch.Tensor]


# ---- export -------------------------------------------------------------------------------------


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """Strip megatron's DDP / Float16Module wrappers (both keep the model under ``.module``)."""
    while not hasattr(module, "language_model") and hasattr(module, "module"):
        module = module.module
    return module


def _as_chunks(model_chunks) -> list[torch.nn.Module]:
    chunks = list(model_chunks) if isinstance(model_chunks, (list, tuple)) else [model_chunks]
    return [_unwrap(c) for c in chunks]


@dataclass(frozen=True)
class _Layout:
    tp: int
    pp: int
    vpp: int | None
    tp_rank: int
    pp_rank: int
    tp_group: object
    pp_group: object


def _layout(num_chunks: int) -> _Layout:
    from megatron.core import parallel_state as ps

    return _Layout(
        tp=ps.get_tensor_model_parallel_world_size(),
        pp=ps.get_pipeline_model_parallel_world_size(),
        vpp=num_chunks if num_chunks > 1 else None,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
    )


def is_export_destination() -> bool:
    """True on the rank that receives the tensors with ``dst_rank_only=True`` (TP rank 0 of the
    first pipeline stage: one per data-parallel replica)."""
    from megatron.core import parallel_state as ps

    return ps.get_tensor_model_parallel_rank() == 0 and ps.get_pipeline_model_parallel_rank() == 0


def export_maps(hf_config, pp: int) -> list:
    """The parameters exported, in the order every rank walks them. A tied output layer is a copy
    of ``embed_tokens`` (HF drops ``lm_head.weight`` when tied), so it is left out."""
    maps = layout_maps(hf_config, pp)
    if hf_config.tie_word_embeddings:
        maps = [m for m in maps if m.megatron != OUTPUT_LAYER]
    return maps


def export_hf_weights(model_chunks, hf_config, *, dst_rank_only: bool = False) -> Iterator[NamedTensor]:
    """Yield ``(hf_name, full tensor)`` for every HF weight of the sharded policy.

    ``model_chunks``: this rank's model (``build_policy``'s return value, one module or the list of
    virtual-pipeline chunks; megatron DDP wrappers are unwrapped). Must be called on every rank of
    the model-parallel group and iterated to the end on every rank: each parameter is one round
    of collectives (TP all-gather on the owning stage, then a broadcast over the PP group).

    With ``dst_rank_only=False`` every rank receives every tensor. With ``dst_rank_only=True`` the
    TP shards are gathered to TP rank 0 only and only sent on to the first pipeline stage, so the
    tensors are yielded on :func:`is_export_destination` ranks only and other ranks yield nothing
    (but must still exhaust the iterator).

    Yielded tensors may alias live parameters (a replicated norm is the parameter itself): copy
    them before the next optimizer step if they are kept. Names follow the HF state dict exactly;
    the order is the conversion map's (language model, then the vision tower).
    """
    chunks = _as_chunks(model_chunks)
    lay = _layout(len(chunks))
    num_layers = hf_config.text_config.num_hidden_layers
    own: dict[str, torch.Tensor] = {}
    for vp_stage, chunk in enumerate(chunks):
        for name, param in chunk.named_parameters():
            own[global_name(name, lay.pp_rank, vp_stage, num_layers, lay.pp, lay.vpp)] = param
    if not own:
        raise ValueError("export_hf_weights: the model has no parameters")
    device = next(iter(own.values())).device
    shapes = {**expected_lm_shapes(hf_config), **expected_vision_shapes(hf_config)}
    maps = export_maps(hf_config, lay.pp)
    dtypes = _gather_dtypes(own, maps, lay)
    is_dst = lay.tp_rank == 0 and lay.pp_rank == 0
    for m in maps:
        owner = place(m, num_layers, lay.pp, lay.vpp).pp_rank
        tensors: list[torch.Tensor] | None = None
        if owner == lay.pp_rank:
            if m.megatron not in own:
                raise KeyError(f"export_hf_weights: {m.megatron} is not a parameter of pipeline stage {owner}")
            shards = _gather_tp(own[m.megatron].detach(), m.split, lay, to_rank0_only=dst_rank_only)
            tensors = m.unshard(shards) if shards is not None else None
        if lay.pp > 1:
            tensors = _across_stages(tensors, m, owner, shapes, dtypes[m.megatron], device, lay, dst_rank_only)
        if tensors is None or (dst_rank_only and not is_dst):
            continue
        for name, tensor in zip(m.hf, tensors):
            yield name, tensor


def _gather_dtypes(own: dict[str, torch.Tensor], maps, lay: _Layout) -> dict[str, torch.dtype]:
    """Every exported parameter's dtype on every rank (stages only know their own parameters)."""
    mine = {m.megatron: own[m.megatron].dtype for m in maps if m.megatron in own}
    if lay.pp == 1:
        return mine
    everyone: list[dict | None] = [None] * lay.pp
    dist.all_gather_object(everyone, mine, group=lay.pp_group)
    merged: dict[str, torch.dtype] = {}
    for part in everyone:
        merged.update(part or {})
    missing = [m.megatron for m in maps if m.megatron not in merged]
    if missing:
        raise KeyError(f"export_hf_weights: no pipeline stage holds {missing[:3]}; the model does not match the config")
    return merged


def _gather_tp(shard: torch.Tensor, split: str, lay: _Layout, *, to_rank0_only: bool) -> list[torch.Tensor] | None:
    """All TP ranks' shards in rank order (None on ranks that do not receive them)."""
    if split == "replicated" or lay.tp == 1:
        return [shard]
    shard = shard.contiguous()
    if not to_rank0_only:
        out = [torch.empty_like(shard) for _ in range(lay.tp)]
        dist.all_gather(out, shard, group=lay.tp_group)
        return out
    dst = dist.get_global_rank(lay.tp_group, 0)
    out = [torch.empty_like(shard) for _ in range(lay.tp)] if lay.tp_rank == 0 else None
    dist.gather(shard, out, dst=dst, group=lay.tp_group)
    return out


def _across_stages(tensors, m, owner: int, shapes, dtype, device, lay: _Layout, dst_rank_only: bool):
    """The owner stage's HF tensors on the other stages (all of them, or only stage 0)."""
    if dst_rank_only:
        if lay.tp_rank != 0 or owner == 0 or lay.pp_rank not in (0, owner):
            return tensors if lay.pp_rank == owner else None
        peer = dist.get_global_rank(lay.pp_group, 0 if lay.pp_rank == owner else owner)
        if lay.pp_rank == owner:
            for t in tensors:
                dist.send(t.contiguous(), dst=peer, group=lay.pp_group)
            return None
        out = [torch.empty(shapes[n], dtype=dtype, device=device) for n in m.hf]
        for t in out:
            dist.recv(t, src=peer, group=lay.pp_group)
        return out
    src = dist.get_global_rank(lay.pp_group, owner)
    if lay.pp_rank == owner:
        tensors = [t.contiguous() for t in tensors]
    else:
        tensors = [torch.empty(shapes[n], dtype=dtype, device=device) for n in m.hf]
    for t in tensors:
        dist.broadcast(t, src=src, group=lay.pp_group)
    return tensors


# ---- buckets ------------------------------------------------------------------------------------


def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def bucketize(
    named_tensors: Iterable[NamedTensor], max_bytes: int = DEFAULT_BUCKET_BYTES
) -> Iterator[list[NamedTensor]]:
    """Consecutive tensors grouped into buckets of at most ``max_bytes`` (a tensor larger than
    that is a bucket of its own). Lazy: a bucket is yielded as soon as the next tensor would not
    fit, so at most one bucket (plus one tensor) is held at a time."""
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    bucket: list[NamedTensor] = []
    size = 0
    for name, tensor in named_tensors:
        nbytes = tensor_bytes(tensor)
        if bucket and size + nbytes > max_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes
    if bucket:
        yield bucket


@dataclass(frozen=True)
class FlatEntry:
    """Where one tensor lives in a :class:`FlatBucket` (``offset`` in elements of the buffer)."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    numel: int


@dataclass
class FlatBucket:
    """One bucket as a single contiguous 1-D buffer plus the metadata to cut it apart again.

    A bucket of one dtype is packed in that dtype (offsets count elements, as SGLang's
    ``FlattenedTensorMetadata.start_idx`` does); a mixed-dtype bucket is packed as raw bytes
    (``uint8``, offsets in bytes, each aligned to 16 so that every dtype can be viewed in place).
    """

    buffer: torch.Tensor
    entries: list[FlatEntry]

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.buffer)

    def unflatten(self) -> list[NamedTensor]:
        """The bucket's tensors again (views into ``buffer``, bit-identical to the originals)."""
        out = []
        raw = self.buffer.dtype == torch.uint8
        for e in self.entries:
            if raw and e.dtype != torch.uint8:
                size = e.numel * e.dtype.itemsize
                piece = self.buffer[e.offset : e.offset + size].view(e.dtype)
            else:
                piece = self.buffer[e.offset : e.offset + e.numel]
            out.append((e.name, piece.reshape(e.shape)))
        return out


def flatten(bucket: Sequence[NamedTensor], *, as_bytes: bool = False) -> FlatBucket:
    """Pack ``bucket`` into a :class:`FlatBucket` (one copy of the data, on the tensors' device).
    ``as_bytes``: pack as raw bytes even when the bucket has one dtype (SGLang 0.5.23's
    ``FlattenedTensorBucket`` is a uint8 buffer with byte offsets for any mix of dtypes)."""
    if not bucket:
        raise ValueError("cannot flatten an empty bucket")
    devices = {t.device for _, t in bucket}
    if len(devices) != 1:
        raise ValueError(f"a bucket's tensors must share one device, got {sorted(map(str, devices))}")
    dtypes = {t.dtype for _, t in bucket}
    entries: list[FlatEntry] = []
    if len(dtypes) == 1 and not as_bytes:
        offset = 0
        for name, t in bucket:
            entries.append(FlatEntry(name, t.dtype, tuple(t.shape), offset, t.numel()))
            offset += t.numel()
        buffer = torch.cat([t.reshape(-1) for _, t in bucket]) if len(bucket) > 1 else bucket[0][1].reshape(-1).clone()
        return FlatBucket(buffer, entries)
    offset = 0
    for name, t in bucket:
        entries.append(FlatEntry(name, t.dtype, tuple(t.shape), offset, t.numel()))
        offset += -(-tensor_bytes(t) // _ALIGN) * _ALIGN
    buffer = torch.zeros(offset, dtype=torch.uint8, device=devices.pop())
    for e, (_, t) in zip(entries, bucket):
        raw = t.contiguous().reshape(-1).view(torch.uint8)
        buffer[e.offset : e.offset + raw.numel()].copy_(raw)
    return FlatBucket(buffer, entries)


# ---- protocol and measurements ------------------------------------------------------------------


class _Counter:
    """Counts the tensors and bytes that flow through an iterator."""

    def __init__(self) -> None:
        self.tensors = 0
        self.bytes = 0

    def count(self, named_tensors: Iterable[NamedTensor]) -> Iterator[NamedTensor]:
        for name, tensor in named_tensors:
            self.tensors += 1
            self.bytes += tensor_bytes(tensor)
            yield name, tensor


def _rate(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


def measure_export(model_chunks, hf_config, *, dst_rank_only: bool = False,
                   bucket_bytes: int = DEFAULT_BUCKET_BYTES) -> dict[str, float]:
    """Export and bucket the whole model once, touching nothing else; this rank's bytes, seconds
    and GB/s (1e9 bytes per second)."""
    counter = _Counter()
    buckets = 0
    start = time.perf_counter()
    for _ in bucketize(counter.count(export_hf_weights(model_chunks, hf_config, dst_rank_only=dst_rank_only)),
                       bucket_bytes):
        buckets += 1
    seconds = time.perf_counter() - start
    return {"bytes": counter.bytes, "tensors": counter.tensors, "buckets": buckets, "seconds": seconds,
            "gb_per_s": _rate(counter.bytes, seconds)}


def sync_weights(engine, model_chunks, hf_config, bucket_bytes: int = DEFAULT_BUCKET_BYTES, *,
                 version: int | None = None, dst_rank_only: bool = True) -> dict[str, float]:
    """The colocated weight sync, in order: resume the engine's ``weights`` memory, stream the
    export through buckets into ``engine.update_weights``, resume ``kv_cache`` (the engine adapters
    flush their prefix caches then, once the KV memory is back).

    Call it on every rank of the model-parallel group. ``engine`` is the rollout engine on the
    rank that drives it and None elsewhere; ranks without an engine only take part in the export's
    collectives. With ``dst_rank_only`` (default) the engine must live on an
    :func:`is_export_destination` rank. Returns seconds, bytes, tensors, buckets and GB/s.
    """
    if engine is not None and dst_rank_only and not is_export_destination():
        raise ValueError("sync_weights: with dst_rank_only=True the engine must be driven from TP rank 0 of "
                         "the first pipeline stage (is_export_destination()); other ranks pass engine=None")
    counter = _Counter()
    buckets_seen = 0

    def stream() -> Iterator[list[NamedTensor]]:
        nonlocal buckets_seen
        for bucket in bucketize(counter.count(export_hf_weights(model_chunks, hf_config,
                                                                dst_rank_only=dst_rank_only)), bucket_bytes):
            buckets_seen += 1
            yield bucket

    start = time.perf_counter()
    if engine is None:
        for _ in stream():
            pass
    else:
        engine.resume_memory(["weights"])
        buckets = stream()
        try:
            engine.update_weights(buckets, version)
        finally:
            # An engine that stopped early (or raised) must not leave the other ranks hanging in the
            # export's collectives; a generator that raised is finished, so this is then a no-op.
            for _ in buckets:
                pass
        engine.resume_memory(["kv_cache"])
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "bytes": counter.bytes, "tensors": counter.tensors, "buckets": buckets_seen,
            "gb_per_s": _rate(counter.bytes, seconds)}
