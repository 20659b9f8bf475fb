"""The ``prism`` command.

    prism run CONFIG [key=value ...]          run the PRISM pipeline described by CONFIG
    prism eval CONFIG --checkpoint C [--split D] [--benchmark NAME=PATH ...] [--k K --temperature T]
    prism convert hf-to-megatron --hf-dir D --out O [--tp N] [--pp N]
    prism convert megatron-to-hf --megatron-dir D --out O
    prism experiment CONFIG --arms A,B --seeds N [--algorithm grpo|dapo|gspo] [--out DIR] [key=value ...]
    prism plan CONFIG --nodes N --gpus-per-node G [--gpu-mem GIB] [--auto]  layout + memory planner

Errors the user can fix (a bad config key, a bad checkpoint) are printed as one line on stderr
with exit status 2 (usage/config) or 1 (checkpoint), never as a traceback. Heavy modules (torch,
the model code) are imported inside the subcommand that needs them, so ``prism run --help`` and
config errors are instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings
from pathlib import Path

from megatron_prism import __version__
from megatron_prism.config import STAGE_ORDER, ConfigError, PrismConfig, dump_config, load_config

def _err(message: str) -> None:
    print(f"prism: error: {message}", file=sys.stderr)


def run_pipeline(cfg: PrismConfig) -> int:
    """Run the enabled stages in pipeline order (see ``STAGE_ORDER``) and print the report paths."""
    from megatron_prism.models.errors import CheckpointError
    from megatron_prism.pipeline import run

    try:
        report = run(cfg)
    except (CheckpointError, FileNotFoundError) as exc:
        _err(str(exc))
        return 2
    print(f"[prism] report: {report} and {report.with_suffix('.json')}")
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        _err(str(exc))
        return 2
    try:
        resolved = dump_config(cfg, Path(cfg.run.output_dir) / "config.yaml")
    except OSError as exc:
        _err(f"cannot write the resolved config under run.output_dir={cfg.run.output_dir!r}: {exc}")
        return 1
    print(f"resolved config written to {resolved}")
    skipped = [n for n in STAGE_ORDER if n not in cfg.stages or not cfg.stages[n].enabled]
    if skipped:
        print(f"stages disabled or absent: {', '.join(skipped)}")
    return run_pipeline(cfg)


def _cmd_eval(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
        benchmarks = dict(item.split("=", 1) for item in args.benchmark)
    except ConfigError as exc:
        _err(str(exc))
        return 2
    except ValueError:
        _err("--benchmark takes NAME=PATH, e.g. --benchmark mathvista=/data/MathVista")
        return 2
    if not benchmarks and args.split is None:
        _err("nothing to evaluate: give --split DIR (held-out records) and/or --benchmark NAME=PATH")
        return 2
    from megatron_prism.models.errors import CheckpointError
    from megatron_prism.stages.benchmark import evaluate_checkpoint

    out = Path(args.out or Path(cfg.run.output_dir) / "eval_report.json")
    try:
        report = evaluate_checkpoint(cfg, args.checkpoint, benchmarks=benchmarks, split=args.split, k=args.k,
                                     temperature=args.temperature, out=out)
    except (CheckpointError, FileNotFoundError, KeyError) as exc:
        _err(str(exc))
        return 2
    print(report.table())
    print(f"[prism] evaluation report: {out}")
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    """Every (arm, seed) as a prism run + k-sample eval, then experiment_report.json/md."""
    from megatron_prism.experiments import ExperimentError, ExperimentSpec, parse_arms, run_experiment
    from megatron_prism.registry import UnknownNameError

    if any("=" not in item for item in args.benchmark):
        _err("--benchmark takes NAME=PATH, e.g. --benchmark mathvista=/data/MathVista")
        return 2
    try:
        spec = ExperimentSpec(config=Path(args.config), arms=parse_arms(args.arms), seeds=args.seeds,
                              algorithm=args.algorithm, out=Path(args.out) if args.out else None,
                              overrides=args.overrides, k=args.k, temperature=args.temperature,
                              benchmarks=dict(item.split("=", 1) for item in args.benchmark), launcher=args.launcher)
        js, md = run_experiment(spec)
    except (ConfigError, UnknownNameError, FileNotFoundError, ValueError, ExperimentError) as exc:
        _err(str(exc))
        return 2
    print(md.read_text())
    print(f"[prism] experiment report: {md} and {js}")
    return 0


def _convert(action, describe: str) -> int:
    """Run one conversion; a bad or missing checkpoint is a one-line error, not a traceback."""
    from megatron_prism.models.errors import CheckpointError

    try:
        out = action()
    except CheckpointError as exc:  # exit 2, as tools/convert_*.py
        _err(str(exc))
        return 2
    except FileNotFoundError as exc:
        _err(f"{exc.strerror}: {exc.filename}" if exc.filename else str(exc))
        return 2
    print(f"{describe} written to {out}")
    return 0


def _cmd_hf_to_megatron(args: argparse.Namespace) -> int:
    from megatron_prism.models.conversion import convert_hf_to_megatron

    return _convert(
        lambda: convert_hf_to_megatron(args.hf_dir, args.out, tp=args.tp, pp=args.pp),
        f"megatron checkpoint (tp={args.tp}, pp={args.pp})",
    )


def _cmd_megatron_to_hf(args: argparse.Namespace) -> int:
    from megatron_prism.models.conversion import convert_megatron_to_hf

    return _convert(lambda: convert_megatron_to_hf(args.megatron_dir, args.out), "HF checkpoint")


def _cmd_plan(args: argparse.Namespace) -> int:
    """Layout + memory planner (torch-free unless the config uses the built-in tiny model)."""
    from megatron_prism.plan import Assumptions, PlanError, run_plan

    try:
        cfg = load_config(args.config, args.overrides)
        status, text = run_plan(cfg, args.nodes, args.gpus_per_node, args.gpu_mem, preset=args.preset, auto=args.auto,
                                asm=Assumptions(peak_tflops=args.peak_tflops, mfu=args.mfu,
                                                decode_tokens_per_s_per_gpu=args.decode_tokens_per_s),
                                json_out=args.json, source=args.config, overrides=args.overrides)
    except (ConfigError, PlanError) as exc:
        _err(str(exc))
        return 2
    print(text)
    return status


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed so tests and docs can inspect it)."""
    parser = argparse.ArgumentParser(prog="prism", description="PRISM post-training for Qwen3-VL on megatron-core.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the pipeline stages described by a config file")
    run.add_argument("config", metavar="CONFIG", help="YAML config file, e.g. examples/configs/tiny.yaml")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=1e-6")
    run.set_defaults(handler=_cmd_run)

    ev = sub.add_parser("eval", help="k-sample evaluation of a checkpoint on held-out records and/or benchmarks")
    ev.add_argument("config", metavar="CONFIG", help="the run's YAML config (model layout, rollout, reward)")
    ev.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")
    ev.add_argument("--checkpoint", required=True, help="HF directory or megatron_prism checkpoint to evaluate")
    ev.add_argument("--split", default=None, help="a directory or file of held-out records (e.g. <data>/eval)")
    ev.add_argument("--benchmark", action="append", default=[], metavar="NAME=PATH",
                    help="a benchmark by loader name (mathvista, mathverse, mathvision, wemath, mmmu, mmmu_pro, "
                         "hallusion_bench) and its local files; repeatable")
    ev.add_argument("--k", type=_positive_int, default=1, help="samples per item (pass@k up to k)")
    ev.add_argument("--temperature", type=float, default=0.0)
    ev.add_argument("--out", default=None, help="report JSON (default <run.output_dir>/eval_report.json)")
    ev.set_defaults(handler=_cmd_eval)

    ex = sub.add_parser("experiment", help="named arms x seeds, each a prism run + k-sample eval, and a report "
                                           "with mean +- std over seeds and paired tests against the baseline")
    ex.add_argument("config", metavar="CONFIG", help="the YAML config every arm starts from")
    ex.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides applied to every arm")
    ex.add_argument("--arms", required=True, help="comma-separated arm names: baseline, prism, align-data-as-sft, "
                                                 "dense-disc, text-only-disc, dedicated-experts")
    ex.add_argument("--seeds", type=_positive_int, required=True, help="runs per arm (run.seed + 0..N-1)")
    ex.add_argument("--algorithm", choices=("grpo", "dapo", "gspo"), default="grpo", help="the RLVR algorithm")
    ex.add_argument("--out", default=None, help="experiment directory (default <run.output_dir>/experiment)")
    ex.add_argument("--k", type=_positive_int, default=1, help="evaluation samples per item")
    ex.add_argument("--temperature", type=float, default=0.0, help="evaluation sampling temperature")
    ex.add_argument("--benchmark", action="append", default=[], metavar="NAME=PATH", help="also evaluate a benchmark")
    ex.add_argument("--launcher", default="", help="command in front of each run, e.g. 'torchrun --nproc-per-node 8'")
    ex.set_defaults(handler=_cmd_experiment)

    convert = sub.add_parser("convert", help="convert checkpoints between HF and megatron layouts")
    csub = convert.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    h2m = csub.add_parser("hf-to-megatron", help="HF Qwen3-VL directory -> megatron_prism TP x PP checkpoint")
    h2m.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors)")
    h2m.add_argument("--out", required=True, help="output checkpoint directory")
    h2m.add_argument("--tp", type=_positive_int, default=1, help="tensor-parallel size (default 1)")
    h2m.add_argument("--pp", type=_positive_int, default=1, help="pipeline-parallel size (default 1)")
    h2m.set_defaults(handler=_cmd_hf_to_megatron)
    m2h = csub.add_parser("megatron-to-hf", help="megatron_prism checkpoint -> HF Qwen3-VL directory")
    m2h.add_argument("--megatron-dir", required=True, help="checkpoint written by hf-to-megatron or training")
    m2h.add_argument("--out", required=True, help="output HF directory")
    m2h.set_defaults(handler=_cmd_megatron_to_hf)
    plan = sub.add_parser("plan", help="check (or choose) the parallel layout and estimate memory per GPU")
    plan.add_argument("config", metavar="CONFIG", help="the run's YAML config")
    plan.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")
    plan.add_argument("--nodes", type=_positive_int, required=True)
    plan.add_argument("--gpus-per-node", type=_positive_int, required=True)
    plan.add_argument("--gpu-mem", type=float, default=80.0, metavar="GIB", help="memory per GPU in GiB (default 80)")
    plan.add_argument("--auto", action="store_true", help="choose the layout instead of checking the config's")
    plan.add_argument("--preset", default=None, help="model shape when model.hf_dir has no config.json yet "
                                                     "(qwen3vl-8b, qwen3vl-4b, qwen3vl-2b)")
    plan.add_argument("--peak-tflops", type=float, default=989.0, help="throughput assumption: bf16 peak per GPU")
    plan.add_argument("--mfu", type=float, default=0.35, help="throughput assumption: model FLOPs utilisation")
    plan.add_argument("--decode-tokens-per-s", type=float, default=1500.0, help="throughput assumption per GPU")
    plan.add_argument("--json", default=None, metavar="FILE", help="also write the estimate as JSON")
    plan.set_defaults(handler=_cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``prism`` console script; returns the process exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[prism] %(levelname)s %(name)s: %(message)s")
    for noisy in ("megatron", "torch", "transformers"):  # their INFO lines drown the run's progress
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # megatron-core announces at import time every optional package it falls back from (Transformer
    # Engine, Apex); which backend the model really uses is chosen and reported by our own specs, so
    # these notices only bury the run's output and the one-line errors below them.
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).*not installed", category=UserWarning)
    warnings.filterwarnings("ignore", message=r"Apex is not installed", category=UserWarning)
    try:
        return args.handler(args)
    finally:
        if args.command in ("run", "eval"):  # the commands that set up process groups
            from megatron_prism.parallel.state import shutdown_parallel

            shutdown_parallel()


if __name__ == "__main__":
    sys.exit(main())
