"""Generated tokens/s of the embedded rollout engine against transformers' ``generate``.

Both run greedy decoding of the same prompts (mixed lengths; every other prompt carries an image,
one of them two) for the same number of new tokens with no stop ids, so both produce exactly
``batch x new_tokens`` tokens; the time includes image encoding and prefill. Each is warmed up
first and the best of ``--repeats`` timed runs (the two alternating) is reported, one line per batch size::

    batch 16: engine 812 tok/s, hf 301 tok/s, 2.70x

Shapes: on CPU the default is the tiny random Qwen3-VL variant ``a`` of
``megatron_prism.models.qwen3vl.tiny`` (4 layers, hidden 64); on a GPU the default is
``medium`` (8 layers, hidden 1024, 16 heads / 8 KV heads of 64, vocab 32k, a 4-block ViT of
width 256), where per-step Python overhead no longer dominates. ``--shape`` overrides.
Examples::

    python tools/bench_rollout.py
    python tools/bench_rollout.py --batch-sizes 1 4 16 64 --new-tokens 128 --device cuda
    python tools/bench_rollout.py --threads 1 --clock process --repeats 10   # a shared CPU box
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_prism.models.qwen3vl.tiny import TOKENS, save_random_qwen3vl  # noqa: E402
from megatron_prism.rollout.embedded import EmbeddedEngine  # noqa: E402
from megatron_prism.rollout.interface import GenerationRequest, SamplingParams  # noqa: E402

MEDIUM = dict(
    text=dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
              num_key_value_heads=8, head_dim=64, vocab_size=32000, rms_norm_eps=1e-6,
              max_position_embeddings=8192, hidden_act="silu",
              rope_parameters={"rope_type": "default", "rope_theta": 1000000.0,
                               "mrope_section": [12, 10, 10], "mrope_interleaved": True}),
    vision=dict(depth=4, hidden_size=256, intermediate_size=1024, num_heads=4, patch_size=16,
                temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=1024,
                num_position_embeddings=256, deepstack_visual_indexes=[1, 2]),
)


def build_model(shape: str, out: Path) -> tuple[Path, int]:
    """A random HF directory of the given shape; returns (path, pixel patch dim)."""
    if shape == "tiny":
        return save_random_qwen3vl(out, "a", seed=0), 3 * 2 * 4 * 4
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(0)
    cfg = Qwen3VLConfig(text_config=MEDIUM["text"], vision_config=MEDIUM["vision"], tie_word_embeddings=False,
                        **TOKENS)
    Qwen3VLForConditionalGeneration(cfg).save_pretrained(out)
    v = MEDIUM["vision"]
    return out, 3 * v["temporal_patch_size"] * v["patch_size"] ** 2


def make_prompts(batch: int, patch_dim: int, vocab_text: int, seed: int = 0) -> list[GenerationRequest]:
    gen = torch.Generator().manual_seed(seed)
    img, vs, ve = TOKENS["image_token_id"], TOKENS["vision_start_token_id"], TOKENS["vision_end_token_id"]
    reqs = []
    for i in range(batch):
        grids = [] if i % 2 else ([[1, 4, 4], [1, 2, 6]] if i % 4 == 0 else [[1, 6, 4]])
        ids = torch.randint(0, vocab_text, (5 + 3 * (i % 5),), generator=gen).tolist()
        for t, h, w in grids:
            ids += [vs] + [img] * (t * h * w // 4) + [ve] + torch.randint(0, vocab_text, (3,), generator=gen).tolist()
        ids += torch.randint(0, vocab_text, (4,), generator=gen).tolist()
        thw = torch.tensor(grids) if grids else None
        pv = torch.randn(int(thw.prod(-1).sum()), patch_dim, generator=gen) if grids else None
        reqs.append(GenerationRequest(ids, pv, thw, f"p{i}"))
    return reqs


def hf_inputs(reqs: list[GenerationRequest], device: torch.device) -> dict:
    p = max(len(r.prompt_ids) for r in reqs)
    ids = torch.zeros(len(reqs), p, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(reqs):
        ids[i, p - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
        mask[i, p - len(r.prompt_ids):] = 1
    out = dict(input_ids=ids, attention_mask=mask, mm_token_type_ids=(ids == TOKENS["image_token_id"]).int())
    imgs = [r for r in reqs if r.pixel_values is not None]
    if imgs:
        out["pixel_values"] = torch.cat([r.pixel_values for r in imgs])
        out["image_grid_thw"] = torch.cat([r.image_grid_thw for r in imgs])
    return {k: v.to(device) for k, v in out.items()}


def timed_pair(engine_fn, hf_fn, repeats: int, device: torch.device, clock=time.perf_counter) -> tuple[float, float]:
    """Best time of each over ``repeats`` rounds, the two alternating so that load from other
    processes on the machine hits both alike. ``clock``: wall time by default; ``time.process_time``
    (this process's CPU time) on a shared CPU box, where wall time mostly measures the neighbours."""
    best = [float("inf"), float("inf")]
    for _ in range(repeats):
        for k, fn in enumerate((engine_fn, hf_fn)):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = clock()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            best[k] = min(best[k], clock() - t0)
    return best[0], best[1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--shape", choices=["tiny", "medium"], default=None, help="default: tiny on CPU, medium on GPU")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                    help="default: float32 on CPU, bfloat16 on GPU")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--clock", choices=["wall", "process"], default="wall",
                    help="process: this process's CPU time (CPU only; robust to other load on the box)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            ap.error(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    from transformers import Qwen3VLForConditionalGeneration

    device = torch.device(args.device)
    if args.clock == "process" and device.type != "cpu":
        ap.error("--clock process measures CPU time; on a GPU use the default wall clock")
    clock = time.process_time if args.clock == "process" else time.perf_counter
    shape = args.shape or ("tiny" if device.type == "cpu" else "medium")
    dtype = getattr(torch, args.dtype or ("float32" if device.type == "cpu" else "bfloat16"))
    with tempfile.TemporaryDirectory() as tmp:
        path, patch_dim = build_model(shape, Path(tmp) / shape)
        engine = EmbeddedEngine(path, device=device, dtype=dtype)
        hf = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=dtype).to(device).eval()
    print(f"device {device} ({torch.get_num_threads()} threads), shape {shape}, dtype {dtype}, "
          f"{args.new_tokens} new tokens, greedy, {args.clock} clock", flush=True)
    sp = SamplingParams(temperature=0.0, max_new_tokens=args.new_tokens)
    gen_kw = dict(do_sample=False, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                  pad_token_id=0, eos_token_id=None)
    vocab_text = TOKENS["image_token_id"] - 10
    warm = make_prompts(2, patch_dim, vocab_text, seed=99)
    engine.generate(warm, sp)
    with torch.inference_mode():
        hf.generate(**hf_inputs(warm, device), **gen_kw)
    for bs in args.batch_sizes:
        reqs = make_prompts(bs, patch_dim, vocab_text)
        inputs = hf_inputs(reqs, device)
        with torch.inference_mode():
            t_engine, t_hf = timed_pair(lambda: engine.generate(reqs, sp), lambda: hf.generate(**inputs, **gen_kw),
                                        args.repeats, device, clock)
        tokens = bs * args.new_tokens
        print(f"batch {bs}: engine {tokens / t_engine:.0f} tok/s, hf {tokens / t_hf:.0f} tok/s, "
              f"{t_hf / t_engine:.2f}x", flush=True)


if __name__ == "__main__":
    main()
