#!/usr/bin/env python
"""One RLVR step, this project against TRL's GRPOTrainer, on the same tiny Qwen3-VL and prompts.

    python tools/bench_rlvr.py                     # 4 prompts x 8 samples, 64 new tokens, 3 steps each
    python tools/bench_rlvr.py --groups 8 --n 8 --new-tokens 64 --steps 4 --json out.json

A step is what an RLVR user waits for: generate a group of responses per prompt, score them with
the verifiable reward, advantages, the policy-gradient loss and one optimizer step (and, for this
project, the weight sync to the rollout engine). Both sides get the same tiny Qwen3-VL (the
embedded default's model, built for the synthetic task's tokenizer), the same RL prompts in the
same order, the same group size, number of prompts per step, generation length (sampling at
temperature 1), learning rate, no KL term, one optimizer step per generation batch (strictly
on-policy, so neither recomputes old log-probs) and the same reward function
(``exact_format``: 0.8 accuracy + 0.2 format).

* this project: ``prism run examples/configs/tiny.yaml`` with only the RLVR stage on, in a
  subprocess (the command a user runs); its per-step time is the sum of the step's phases in
  ``metrics.jsonl`` (sync, rollout incl. scoring, log-probs, train);
* TRL: ``GRPOTrainer`` (``use_cpu``, fp32, ``beta=0``, ``num_iterations=1``), in a subprocess; its
  step time from a callback between ``on_step_begin`` and ``on_step_end``. TRL is given the prompt
  text only: its vision-language path wants a Hugging Face processor with an image processor,
  which the synthetic task's tokenizer directory does not have. This project also encodes each
  prompt's image (16 vision tokens on the 128x128 task; 4 at 64x64 before prism-synth-3), so the
  comparison leans against it.

The first step of each side is a warm-up and is not counted. Figures: samples/s (responses per
second of step time) and generated tokens/s of each side, and their ratio. TRL must be installed
(``pip install trl``); it is not a dependency of this project. Times on a shared machine are noisy:
say so when quoting them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

REWARD = "exact_format"
SYNTH_SIZES = "sft=16,align=16,rl=256,eval=8"


def _prepare(root: Path, seed: int) -> tuple[Path, Path]:
    """The synthetic task's data and the tiny model built for its tokenizer (as the pipeline does)."""
    from megatron_prism.config.loader import load_config
    from megatron_prism.pipeline import prepare_data, prepare_model

    cfg = load_config(REPO / "examples/configs/tiny.yaml", [f"data.synth_sizes={SYNTH_SIZES}", f"run.seed={seed}"])
    data = prepare_data(cfg, root)
    return data, prepare_model(cfg, root, data)


def _ours(args, data: Path, model: Path, out: Path) -> dict:
    run_dir = out / "ours"
    overrides = [
        f"run.output_dir={run_dir}", f"run.seed={args.seed}", f"data.root={data}", f"model.hf_dir={model}",
        "stages.sft.enabled=false", "stages.warmup.enabled=false", "stages.align.enabled=false",
        "stages.eval.enabled=false", "stages.rlvr.enabled=true", f"stages.rlvr.steps={args.steps}",
        f"stages.rlvr.global_batch_size={args.groups}", f"rollout.n={args.n}",
        f"rollout.max_new_tokens={args.new_tokens}", "rollout.temperature=1.0", "stages.rlvr.eval_every=0",
        f"stages.rlvr.save_every={10 * args.steps}", f"stages.rlvr.lr={args.lr}", "optim.warmup_steps=0",
        f"algorithm.reward={REWARD}", "algorithm.kl_coef=0.0", "algorithm.ppo_epochs=1", "algorithm.mini_batches=1",
        f"parallel.micro_batch_size={args.groups * args.n}", "run.logger=none",
    ]
    cmd = [sys.executable, "-m", "megatron_prism.cli", "run", str(REPO / "examples/configs/tiny.yaml"), *overrides]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"prism run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    steps = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec.get("stage") == "rlvr" and "reward/mean" in rec:
            steps[rec["step"]] = rec
    samples = args.groups * args.n
    rows = []
    for step in sorted(steps)[1:]:  # the first step is a warm-up
        rec = steps[step]
        seconds = sum(v for k, v in rec.items() if k.startswith("time/") and k.endswith("_s"))
        rows.append({"seconds": seconds, "samples": samples, "tokens": rec["response/length"] * samples,
                     "phases": {k: v for k, v in rec.items() if k.startswith("time/")}})
    return {"steps": rows}


def _trl_side(args) -> dict:
    """Runs in its own process: TRL's GRPOTrainer on the same prompts; prints a JSON line."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from megatron_prism.config.loader import load_config
    from megatron_prism.data.loader import load_split
    from megatron_prism.rewards import get_reward
    from megatron_prism.stages.common import input_processor

    torch.manual_seed(args.seed)
    cfg = load_config(REPO / "examples/configs/tiny.yaml", [])
    processor = input_processor(args.model, cfg.data)
    tok = AutoTokenizer.from_pretrained(args.model)
    records, _ = load_split(Path(args.data) / "rl", "rl", strict=False)
    vision = {processor.tokenizer.convert_tokens_to_ids(t) for t in
              ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")}
    rows = []
    for rec in records[: args.groups * (args.steps + 1)]:
        ids = [i for i in processor.prompt(rec).input_ids.tolist() if i not in vision]  # the same prompt, text only
        rows.append({"prompt": tok.decode(ids), "answer": rec.answer or "",
                     "meta": json.dumps({k: v for k, v in rec.meta.items() if k in ("options", "rel_tol")})})
    reward_fn = get_reward(REWARD)

    def reward(completions, answer, meta, **_):
        return [float(reward_fn(c, a, **json.loads(m))) for c, a, m in zip(completions, answer, meta)]

    model = Qwen3VLForConditionalGeneration.from_pretrained(args.model, dtype=torch.float32)
    config = GRPOConfig(
        output_dir=str(Path(args.out) / "trl"), per_device_train_batch_size=args.groups * args.n,
        gradient_accumulation_steps=1, num_generations=args.n, max_completion_length=args.new_tokens,
        max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        temperature=1.0, beta=0.0, num_iterations=1, logging_steps=1, report_to=[], save_strategy="no",
        use_cpu=True, bf16=False, fp16=False, seed=args.seed, dataloader_num_workers=0, shuffle_dataset=False,
    )
    times: list[float] = []
    lengths: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t0)

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tok, callbacks=[StepClock()])
    trainer.train()
    samples = args.groups * args.n
    steps = [{"seconds": t, "samples": samples, "tokens": (lengths[i] if i < len(lengths) else float("nan")) * samples}
             for i, t in enumerate(times)][1:]
    return {"steps": steps}


def _summary(side: dict) -> dict:
    secs = sum(s["seconds"] for s in side["steps"])
    return {"timed_steps": len(side["steps"]), "seconds_per_step": statistics.mean(s["seconds"] for s in side["steps"]),
            "samples_per_s": sum(s["samples"] for s in side["steps"]) / secs,
            "tokens_per_s": sum(s["tokens"] for s in side["steps"]) / secs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=4, help="prompts per step")
    ap.add_argument("--n", type=int, default=8, help="samples per prompt (the group)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--steps", type=int, default=3, help="steps per side, the first a warm-up")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--side", choices=["trl"], help=argparse.SUPPRESS)
    ap.add_argument("--data", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.steps < 2:
        ap.error("--steps must be at least 2 (the first step of each side is a warm-up)")
    if args.side == "trl":
        print("RESULT " + json.dumps(_trl_side(args)), flush=True)
        return 0
    try:
        import trl  # noqa: F401
    except ImportError:
        print("bench_rlvr: TRL is not installed (pip install trl); it is not a dependency of this project")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        data, model = _prepare(out, args.seed)
        ours = _ours(args, data, model, out)
        cmd = [sys.executable, __file__, "--side", "trl", "--data", str(data), "--model", str(model), "--out", str(out),
               "--groups", str(args.groups), "--n", str(args.n), "--new-tokens", str(args.new_tokens),
               "--steps", str(args.steps), "--lr", str(args.lr), "--seed", str(args.seed)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if proc.returncode != 0 or line is None:
            print(f"TRL side failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
            return 1
        theirs = json.loads(line[len("RESULT "):])
    a, b = _summary(ours), _summary(theirs)
    print(f"RLVR step, tiny Qwen3-VL on CPU ({os.cpu_count()} cores), {args.groups} prompts x {args.n} samples, "
          f"{args.new_tokens} new tokens, {a['timed_steps']} timed steps each (after one warm-up)")
    for name, s in (("this project", a), ("TRL GRPOTrainer", b)):
        print(f"  {name:<16} {s['seconds_per_step']:7.2f} s/step  {s['samples_per_s']:7.2f} samples/s  "
              f"{s['tokens_per_s']:8.1f} tokens/s")
    phases: dict[str, float] = {}
    for step in ours["steps"]:
        for k, v in step["phases"].items():
            phases[k] = phases.get(k, 0.0) + v / len(ours["steps"])
    print("  this project's step: " + ", ".join(f"{k[5:-2]} {v:.2f} s" for k, v in phases.items()))
    print(f"  ratio: {a['samples_per_s'] / b['samples_per_s']:.2f}x samples/s, "
          f"{a['tokens_per_s'] / b['tokens_per_s']:.2f}x tokens/s")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k not in ("json",)},
                                         "ours": {**ours, **a}, "trl": {**theirs, **b}}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
