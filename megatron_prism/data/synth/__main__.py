"""CLI: ``python -m megatron_prism.data.synth --out DIR --seed S [--sizes sft=N,align=N,rl=N,eval=N]
[--image-size WxH] [--vocab-size V] [--overwrite]``; prints the counts, special token ids and time."""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

from megatron_prism.data.synth.generate import SPLITS, SynthSizes, generate_dataset


def _sizes(args: argparse.Namespace) -> SynthSizes:
    sizes = SynthSizes(vocab_size=args.vocab_size)
    for item in filter(None, (args.sizes or "").split(",")):
        name, _, value = item.partition("=")
        if name not in SPLITS or not value.isdigit():
            raise SystemExit(f"--sizes: bad item {item!r}; give split=count with split in {SPLITS}")
        sizes = dataclasses.replace(sizes, **{name: int(value)})
    w, _, h = args.image_size.partition("x")
    if not (w.isdigit() and h.isdigit()):
        raise SystemExit(f"--image-size: expected WxH (e.g. 128x128), got {args.image_size!r}")
    return dataclasses.replace(sizes, width=int(w), height=int(h))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_prism.data.synth", description=__doc__)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", default="", help="records per split, e.g. sft=2000,align=500,rl=1000,eval=200")
    parser.add_argument("--image-size", default="128x128", help="WxH in pixels, multiples of 32 (default 128x128)")
    parser.add_argument("--vocab-size", type=int, default=SynthSizes().vocab_size)
    parser.add_argument("--overwrite", action="store_true", help="replace an earlier output in --out")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        manifest = generate_dataset(args.out, args.seed, _sizes(args), overwrite=args.overwrite)
    except (FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{k} {v}" for k, v in manifest.counts.items())
    ids = ", ".join(f"{k} {v}" for k, v in manifest.special_token_ids.items())
    print(f"wrote {args.out}: {counts}; vocab {manifest.vocab_size}; special ids: {ids} "
          f"({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
