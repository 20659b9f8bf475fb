"""A deterministic, resumable, data-parallel-sharded loader over a list of records.

Order is a function of ``(seed, epoch)`` only: each epoch is a fresh permutation drawn from a
generator seeded with both, so a run resumed from a checkpoint sees exactly the batches it would
have seen without the interruption. Every data-parallel rank walks the same permutation and takes
its contiguous share of each global batch, so the ranks' shares partition the global batch.

``state_dict()`` is ``{"seed", "epoch", "position"}`` (position = records consumed in this epoch);
``load_state_dict`` refuses a state from another seed or dataset size, which would silently change
the data order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import torch

from megatron_prism.data.errors import RecordError
from megatron_prism.data.records import DATA_SUFFIXES, Record, SkipCounter, SplitKind, read_records

T = TypeVar("T")


class ShardedLoader(Generic[T]):
    def __init__(
        self,
        items: Sequence[T],
        global_batch_size: int,
        *,
        seed: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        shuffle: bool = True,
    ) -> None:
        if global_batch_size <= 0 or global_batch_size % dp_size:
            raise ValueError(f"global batch size {global_batch_size} must be a positive multiple of the "
                             f"data-parallel size {dp_size}")
        if len(items) < global_batch_size:
            raise ValueError(f"{len(items)} items cannot fill one global batch of {global_batch_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside 0..{dp_size - 1}")
        self.items = items
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.items)))
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(len(self.items), generator=gen).tolist()

    @property
    def batches_per_epoch(self) -> int:
        """Full global batches per epoch (the tail that cannot fill one is dropped, and differs
        each epoch because the permutation does)."""
        return len(self.items) // self.global_batch_size

    def next_global_indices(self) -> list[int]:
        """Indices of the next whole global batch (all ranks), advancing the position."""
        if self.position + self.global_batch_size > len(self.items):
            self.epoch += 1
            self.position = 0
            self._order = self._permutation(self.epoch)
        batch = self._order[self.position:self.position + self.global_batch_size]
        self.position += self.global_batch_size
        return batch

    def next_batch(self) -> list[T]:
        """This rank's share of the next global batch."""
        batch = self.next_global_indices()
        share = self.global_batch_size // self.dp_size
        mine = batch[self.dp_rank * share:(self.dp_rank + 1) * share]
        return [self.items[i] for i in mine]

    def __iter__(self) -> Iterator[list[T]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "size": len(self.items)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed or state["size"] != len(self.items):
            raise ValueError(
                f"loader state is for seed {state['seed']} over {state['size']} items, but this loader has "
                f"seed {self.seed} over {len(self.items)} items; resuming would change the data order"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)


# Splits whose images this process has already decoded (strict mode), keyed by their record files'
# paths, sizes and mtimes: the held-out split is opened again at every evaluation of every stage,
# and decoding it each time would repeat the same work.
_checked_splits: set[tuple] = set()

DEFAULT_IMAGE_CHECK_WORKERS = 2  # data.image_check_workers: decoding is I/O + zlib, which release the GIL


def check_images(records: Sequence[Record], *, workers: int = DEFAULT_IMAGE_CHECK_WORKERS, label: str = "") -> None:
    """Strict mode: decode every image of a split when it is opened, on ``workers`` threads with a
    progress line (``console.CountProgress``), so that a missing, truncated or corrupt image stops
    the run now, before a model is built, not when its batch comes up days later.

    Raises :class:`RecordError` for the first bad image in record order: one line naming the
    record (``file:line``), the image and the fix. Images are decoded (``images.load_image``:
    ``PIL.Image.load`` of every pixel, the decode training does), not only ``verify()``-ed, which
    misses a PNG cut short after its header."""
    from concurrent.futures import Future, ThreadPoolExecutor

    from megatron_prism.console import CountProgress
    from megatron_prism.data.images import load_image

    jobs = [(ref, rec.origin or rec.id) for rec in records for ref in rec.images]
    if not jobs:
        return
    if workers < 1:
        raise ValueError(f"image check workers must be at least 1, got {workers}")
    bar = CountProgress(f"{label or 'split'}: images decoded", len(jobs), unit="images")
    todo = iter(jobs)
    pending: deque[Future] = deque()  # a bounded window: a split of millions of images queues a few futures

    def submit_next() -> None:
        job = next(todo, None)
        if job is not None:  # the decoded image is dropped at once: only whether it decodes matters
            pending.append(pool.submit(lambda ref=job[0], where=job[1]: load_image(ref, where).size))

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="prism-image-check") as pool:
        try:
            for _ in range(8 * workers):
                submit_next()
            while pending:
                pending.popleft().result()  # in order: the first bad image in file order is the one reported
                bar.update()
                submit_next()
        except RecordError as err:
            for fut in pending:
                fut.cancel()
            raise RecordError(f"{err} (data.lenient=false checks every image when a split opens; "
                              "data.lenient=true skips and counts such records instead)") from None
        finally:
            bar.close()


def _split_key(files: Sequence[Path], kind: str) -> tuple:
    return (kind, *((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files))


def load_split(path: str | Path, kind: SplitKind, *, strict: bool = False,
               image_check_workers: int = DEFAULT_IMAGE_CHECK_WORKERS) -> tuple[list[Record], SkipCounter]:
    """All records of a data file (or of every .jsonl/.json/.parquet file of a directory, sorted).

    ``strict`` (``data.lenient: false``): the first bad record is a :class:`RecordError`, and every
    image is decoded now (:func:`check_images`, on ``image_check_workers`` threads; once per split
    and process). Otherwise bad records are skipped and counted in the returned
    :class:`SkipCounter`, and a record whose image cannot be decoded is skipped (and counted once)
    when its batch is built."""
    path = Path(path)
    files = sorted(p for p in path.iterdir() if p.suffix in DATA_SUFFIXES) if path.is_dir() else [path]
    if not files:
        raise FileNotFoundError(f"no {'/'.join(DATA_SUFFIXES)} data files in {path}")
    skips = SkipCounter()
    records = [r for f in files for r in read_records(f, kind, strict=strict, skips=skips)]
    if strict:
        key = _split_key(files, kind)
        if key not in _checked_splits:
            check_images(records, workers=image_check_workers, label=str(path))
            _checked_splits.add(key)
    return records, skips
