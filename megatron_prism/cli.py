"""The ``prism`` command.

    prism run CONFIG [key=value ...]          run the PRISM pipeline described by CONFIG
    prism eval CONFIG --checkpoint C [--split D] [--benchmark NAME=PATH ...] [--k K --temperature T]
    prism convert hf-to-megatron --hf-dir D --out O [--tp N] [--pp N]
    prism convert megatron-to-hf --megatron-dir D --out O
    prism experiment CONFIG --arms A,B --seeds N [--algorithm grpo|dapo|gspo] [--out DIR] [key=value ...]
    prism plan CONFIG --nodes N --gpus-per-node G [--gpu-mem GIB] [--auto]  layout + memory planner
    prism import {sharegpt,llamafactory,verl} IN OUT --kind sft|align|rl|eval   convert other layouts
    prism plot RUN_OR_EXPERIMENT... [--out PNG]       overlay the curves of runs and experiment arms

Validate first: ``run``, ``eval``, ``experiment`` and ``plan`` check the whole config
(``config.validate``) and their own arguments before anything is built. Errors the user can fix (a
bad config key or value, a bad record, benchmark or checkpoint, an unknown name) are printed as one
line on stderr with exit status 2, never as a traceback. Overrides may come before or after the
options (``parse_intermixed_args``); ``--print-config`` prints the resolved config and exits. Heavy
modules (torch, the model code) are imported inside the subcommand that needs them, so
``prism run --help`` and config errors are quick.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_prism import __version__
from megatron_prism.config import STAGE_ORDER, ConfigError, PrismConfig, dump_config, load_config
from megatron_prism.config.validate import positive_int

def _err(message: str) -> None:
    print(f"prism: error: {message}", file=sys.stderr)


# Exit statuses of ``prism run`` (README "Exit codes"): a Slurm script requeues on 75.
EXIT_OK, EXIT_USER_ERROR, EXIT_DIVERGED, EXIT_WRITE_FAILED, EXIT_PREEMPTED = 0, 2, 3, 74, 75


def run_pipeline(cfg: PrismConfig, resume_from: str | None = None) -> int:
    """Run the enabled stages in pipeline order (see ``STAGE_ORDER``) and print the report paths.
    Preemption (75), divergence (3) and a failed checkpoint write (74) are one line each."""
    from megatron_prism.models.errors import CheckpointError
    from megatron_prism.pipeline import run
    from megatron_prism.training.checkpoint import CheckpointWriteError
    from megatron_prism.training.optimizer import TrainingDiverged
    from megatron_prism.training.preemption import Preempted

    try:
        report = run(cfg, resume_from=resume_from)
    except (CheckpointError, FileNotFoundError) as exc:
        _err(str(exc))
        return EXIT_USER_ERROR
    except Preempted as exc:
        print(f"prism: {exc}", file=sys.stderr, flush=True)
        return EXIT_PREEMPTED
    except TrainingDiverged as exc:
        _err(f"training diverged: {exc}")
        return EXIT_DIVERGED
    except CheckpointWriteError as exc:
        _err(str(exc))
        return EXIT_WRITE_FAILED
    print(f"[prism] report: {report} and {report.with_suffix('.json')}")
    return 0


def _print_config(cfg: PrismConfig) -> None:
    """``--print-config``: the resolved config as YAML on stdout (as Hydra's ``--cfg job``)."""
    import yaml

    from megatron_prism.config import config_to_dict

    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False), end="")


def _checked_config(args: argparse.Namespace, **rules) -> PrismConfig | None:
    """The command's config, loaded and checked (``config.validate``); with ``--print-config`` it is
    printed instead and None returned. Raises ConfigError / RecordError (main prints one line)."""
    from megatron_prism.config.validate import check_config

    cfg = load_config(args.config, args.overrides)
    if getattr(args, "print_config", False):
        _print_config(cfg)
        return None
    check_config(cfg, source=args.config, overrides=args.overrides, **rules)
    return cfg


def _cmd_run(args: argparse.Namespace) -> int:
    from megatron_prism.config.validate import launched_world_size

    cfg = _checked_config(args, world_size=launched_world_size())
    if cfg is None:
        return 0
    from megatron_prism.training.run_lock import rank0_run_lock

    # Before anything is written there: a second run on this directory refuses here, in one line.
    with rank0_run_lock(cfg.run.output_dir):
        return _run_locked(args, cfg)


def _run_locked(args: argparse.Namespace, cfg: PrismConfig) -> int:
    try:
        resolved = dump_config(cfg, Path(cfg.run.output_dir) / "config.yaml")
    except OSError as exc:
        _err(f"cannot write the resolved config under run.output_dir={cfg.run.output_dir!r}: {exc}")
        return 1
    print(f"resolved config written to {resolved}")
    skipped = [n for n in STAGE_ORDER if n not in cfg.stages or not cfg.stages[n].enabled]
    if skipped:
        print(f"stages disabled or absent: {', '.join(skipped)}")
    return run_pipeline(cfg, resume_from=args.resume_from)


def _cmd_eval(args: argparse.Namespace) -> int:
    from megatron_prism.config.validate import check_eval_inputs

    # the checkpoint is the model here: its layout rules are checked when it is built
    cfg = _checked_config(args, paths=False, layout=False)
    if cfg is None:
        return 0
    benchmarks = check_eval_inputs(checkpoint=args.checkpoint, split=args.split, benchmarks=args.benchmark,
                                   image_root=args.image_root)
    from megatron_prism.stages.benchmark import evaluate_checkpoint

    out = Path(args.out or Path(cfg.run.output_dir) / "eval_report.json")
    report = evaluate_checkpoint(cfg, args.checkpoint, benchmarks=benchmarks, split=args.split, k=args.k,
                                 temperature=args.temperature, out=out, image_root=args.image_root)
    print(report.table())
    print(f"[prism] evaluation report: {out}")
    return 0


def _cmd_experiment(args: argparse.Namespace) -> int:
    """Every (arm, seed) as a prism run + k-sample eval, then experiment_report.json/md."""
    from megatron_prism.config.validate import check_experiment
    from megatron_prism.eval import parse_benchmark
    from megatron_prism.experiments import ExperimentError, ExperimentSpec, run_experiment

    if _checked_config(args, paths=False, layout=False) is None:
        return 0
    arms = check_experiment(args.config, args.overrides, args.arms, args.algorithm, args.launcher)
    benchmarks = {spec.name: spec.arg().split("=", 1)[1] for spec in map(parse_benchmark, args.benchmark)}
    try:
        spec = ExperimentSpec(config=Path(args.config), arms=arms, seeds=args.seeds,
                              algorithm=args.algorithm, out=Path(args.out) if args.out else None,
                              overrides=args.overrides, k=args.k, temperature=args.temperature,
                              benchmarks=benchmarks, launcher=args.launcher, jobs=args.jobs)
        js, md = run_experiment(spec)
    except (FileNotFoundError, ValueError, ExperimentError) as exc:
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
        if args.print_config:
            _print_config(cfg)
            return 0
        status, text = run_plan(cfg, args.nodes, args.gpus_per_node, args.gpu_mem, preset=args.preset, auto=args.auto,
                                asm=Assumptions(peak_tflops=args.peak_tflops, mfu=args.mfu,
                                                decode_tokens_per_s_per_gpu=args.decode_tokens_per_s),
                                json_out=args.json, source=args.config, overrides=args.overrides)
    except (ConfigError, PlanError) as exc:
        _err(str(exc))
        return 2
    print(text)
    return status


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed so tests and docs can inspect it)."""
    parser = argparse.ArgumentParser(prog="prism", description="PRISM post-training for Qwen3-VL on megatron-core.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the pipeline stages described by a config file")
    run.add_argument("config", metavar="CONFIG", help="YAML config file, e.g. examples/configs/tiny.yaml")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. optim.lr=1e-6")
    run.add_argument("--print-config", action="store_true",
                    help="print the resolved config (file + overrides) as YAML and exit")
    run.add_argument("--resume-from", metavar="PATH", default=None,
                     help="resume from this stage checkpoint (<run>/<stage>/checkpoints/step_N) instead of the "
                          "newest one that verifies")
    run.set_defaults(handler=_cmd_run)

    ev = sub.add_parser("eval", help="k-sample evaluation of a checkpoint on held-out records and/or benchmarks")
    ev.add_argument("config", metavar="CONFIG", help="the run's YAML config (model layout, rollout, reward)")
    ev.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")
    ev.add_argument("--checkpoint", required=True, help="HF directory or megatron_prism checkpoint to evaluate")
    ev.add_argument("--split", default=None, help="a directory or file of held-out records (e.g. <data>/eval)")
    ev.add_argument("--benchmark", action="append", default=[], metavar="NAME=PATH[:SPLIT]",
                    help="a benchmark by loader name (mathvista, mathverse, mathvision, wemath, mmmu, mmmu_pro, "
                         "hallusion_bench), its local files and optionally a split (mathvision=DIR:test); repeatable")
    ev.add_argument("--image-root", default=None, metavar="DIR",
                    help="folder the benchmarks' relative image paths are under, when not beside their files")
    ev.add_argument("--k", type=positive_int, default=1, help="samples per item (pass@k up to k)")
    ev.add_argument("--temperature", type=float, default=0.0)
    ev.add_argument("--out", default=None, help="report JSON (default <run.output_dir>/eval_report.json)")
    ev.add_argument("--print-config", action="store_true",
                    help="print the resolved config (file + overrides) as YAML and exit")
    ev.set_defaults(handler=_cmd_eval)

    ex = sub.add_parser("experiment", help="named arms x seeds, each a prism run + k-sample eval, and a report "
                                           "with mean +- std over seeds and paired tests against the baseline")
    ex.add_argument("config", metavar="CONFIG", help="the YAML config every arm starts from")
    ex.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides applied to every arm")
    ex.add_argument("--arms", required=True, help="comma-separated arm names: baseline, prism, align-data-as-sft, "
                                                 "rl-on-align-prompts, dense-disc, text-only-disc, dedicated-experts")
    ex.add_argument("--seeds", type=positive_int, required=True, help="runs per arm (run.seed + 0..N-1)")
    ex.add_argument("--algorithm", choices=("grpo", "dapo", "gspo"), default="grpo", help="the RLVR algorithm")
    ex.add_argument("--out", default=None, help="experiment directory (default <run.output_dir>/experiment)")
    ex.add_argument("--k", type=positive_int, default=1, help="evaluation samples per item")
    ex.add_argument("--temperature", type=float, default=0.0, help="evaluation sampling temperature")
    ex.add_argument("--benchmark", action="append", default=[], metavar="NAME=PATH[:SPLIT]",
                    help="also evaluate a benchmark")
    ex.add_argument("--launcher", default="", help="command in front of each run, e.g. 'torchrun --nproc-per-node 8'")
    ex.add_argument("--jobs", type=positive_int, default=1,
                    help="runs at once, the CPU cores shared out between them; a run that reuses a shared SFT/WARMUP "
                         "waits for the run training it (default 1; 1 on a GPU node, where the launcher takes the node)")
    ex.add_argument("--print-config", action="store_true",
                    help="print the resolved config (file + overrides) as YAML and exit")
    ex.set_defaults(handler=_cmd_experiment)

    convert = sub.add_parser("convert", help="convert checkpoints between HF and megatron layouts")
    csub = convert.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    h2m = csub.add_parser("hf-to-megatron", help="HF Qwen3-VL directory -> megatron_prism TP x PP checkpoint")
    h2m.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors)")
    h2m.add_argument("--out", required=True, help="output checkpoint directory")
    h2m.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel size (default 1)")
    h2m.add_argument("--pp", type=positive_int, default=1, help="pipeline-parallel size (default 1)")
    h2m.set_defaults(handler=_cmd_hf_to_megatron)
    m2h = csub.add_parser("megatron-to-hf", help="megatron_prism checkpoint -> HF Qwen3-VL directory")
    m2h.add_argument("--megatron-dir", required=True, help="checkpoint written by hf-to-megatron or training")
    m2h.add_argument("--out", required=True, help="output HF directory")
    m2h.set_defaults(handler=_cmd_megatron_to_hf)
    plan = sub.add_parser("plan", help="check (or choose) the parallel layout and estimate memory per GPU")
    plan.add_argument("config", metavar="CONFIG", help="the run's YAML config")
    plan.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides")
    plan.add_argument("--nodes", type=positive_int, required=True)
    plan.add_argument("--gpus-per-node", type=positive_int, required=True)
    plan.add_argument("--gpu-mem", type=float, default=80.0, metavar="GIB", help="memory per GPU in GiB (default 80)")
    plan.add_argument("--auto", action="store_true", help="choose the layout instead of checking the config's")
    plan.add_argument("--preset", default=None, help="model shape when model.hf_dir has no config.json yet "
                                                     "(qwen3vl-8b, qwen3vl-4b, qwen3vl-2b)")
    plan.add_argument("--peak-tflops", type=float, default=989.0, help="throughput assumption: bf16 peak per GPU")
    plan.add_argument("--mfu", type=float, default=0.35, help="throughput assumption: model FLOPs utilisation")
    plan.add_argument("--decode-tokens-per-s", type=float, default=1500.0, help="throughput assumption per GPU")
    plan.add_argument("--json", default=None, metavar="FILE", help="also write the estimate as JSON")
    plan.add_argument("--print-config", action="store_true",
                    help="print the resolved config (file + overrides) as YAML and exit")
    plan.set_defaults(handler=_cmd_plan)

    from megatron_prism.data.importers import add_import_arguments, run_import
    from megatron_prism.plots import add_arguments as add_plot_arguments, run_plot

    imp = sub.add_parser("import", help="convert ShareGPT, LLaMA-Factory or verl files into record JSONL")
    add_import_arguments(imp).set_defaults(handler=run_import)
    plot = sub.add_parser("plot", help="overlay the curves of runs and experiment arms (mean over seeds, band)")
    add_plot_arguments(plot).set_defaults(handler=run_plot)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Like ``build_parser().parse_args``, but a command's ``KEY=VALUE`` overrides may come before,
    between or after its options (``prism plan CFG --nodes 1 parallel.tp=2``), as Hydra, verl and
    NeMo-RL users write them: the command's own parser reads its words with
    ``parse_intermixed_args``."""
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if not argv or argv[0] not in commands or not any(a.dest == "overrides" for a in commands[argv[0]]._actions):
        return parser.parse_args(argv)
    args = commands[argv[0]].parse_intermixed_args(argv[1:])
    args.command = argv[0]
    return args


def user_errors() -> tuple[type[Exception], ...]:
    """What main() turns into one line on stderr and exit status 2: input the user can fix (a config
    key or value, a record or benchmark file, a checkpoint, an unknown registered name). Imported
    only once an exception is being handled, so a quick command stays quick."""
    from megatron_prism.data.budget import ResponseBudgetError
    from megatron_prism.data.errors import RecordError
    from megatron_prism.models.errors import CheckpointError
    from megatron_prism.plan.shapes import PlanError
    from megatron_prism.plots import PlotError
    from megatron_prism.registry import UnknownNameError
    from megatron_prism.training.run_lock import RunLocked

    return (ConfigError, RecordError, ResponseBudgetError, CheckpointError, PlanError, PlotError, UnknownNameError,
            RunLocked)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``prism`` console script; returns the process exit status."""
    from megatron_prism.console import configure_console

    configure_console()
    args = parse_args(argv)
    try:
        return args.handler(args)
    except Exception as exc:  # noqa: BLE001 - a user error is one line; anything else is a bug: re-raised
        if not isinstance(exc, user_errors()):
            raise
        _err(str(exc))
        return 2
    finally:
        if args.command in ("run", "eval"):  # the commands that set up process groups
            from megatron_prism.parallel.state import shutdown_parallel

            shutdown_parallel()


if __name__ == "__main__":
    sys.exit(main())
