"""``prism run`` as a real subprocess (optionally under torchrun) for the pipeline tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "configs" / "tiny.yaml"

# Stage switches every test passes (tiny.yaml may or may not set them itself).
BASE = ["run.logger=none", "stages.warmup.enabled=false", "stages.align.enabled=false",
        "stages.sft.output_dir=null", "stages.rlvr.output_dir=null", "stages.eval.output_dir=null"]


def prism_argv(out_dir: Path, *overrides: str, nproc: int = 1) -> list[str]:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return [*(launcher if nproc > 1 else [sys.executable]), "-m", "megatron_prism.cli", "run", str(TINY),
            f"run.output_dir={out_dir}", *BASE, *overrides]


def prism_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PRISM_PAUSE")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    # One thread per process: on a small shared machine OpenMP threads that outnumber the free
    # cores make a step ~30x slower, and every run of a comparison uses the same thread count.
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def run_prism(out_dir: Path, *overrides: str, nproc: int = 1, timeout: int = 300) -> subprocess.CompletedProcess:
    """``prism run`` to completion; raises with the tail of its output when it fails."""
    proc = subprocess.run(prism_argv(out_dir, *overrides, nproc=nproc), cwd=ROOT, env=prism_env(), capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"prism run failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def stage_checkpoint(run_dir: Path, stage: str) -> Path:
    ckpts = run_dir / stage / "checkpoints"
    return ckpts / (ckpts / "latest").read_text().strip()


_TIMINGS = ("time/", "throughput/", "sync/")


def report_figures(run_dir: Path) -> list[dict]:
    """Every figure of report.json's stages except wall times, throughput and paths (those differ
    run to run), for comparing an interrupted run with an uninterrupted one."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if not k.startswith(_TIMINGS) and k != "artifacts"}
        return value

    return [strip({k: v for k, v in st.items() if k not in ("wall_seconds", "throughput", "checkpoint")})
            for st in json.loads((run_dir / "report.json").read_text())["stages"]]


@dataclass(frozen=True)
class Warm:
    data_root: Path
    checkpoint: Path  # a megatron_prism SFT checkpoint (TP=1)

    def overrides(self) -> list[str]:
        return [f"data.root={self.data_root}", f"model.megatron_dir={self.checkpoint}"]


def shard_tensors(ckpt: Path) -> dict[str, "torch.Tensor"]:
    """Every tensor of the checkpoint's ``mp_rank_*.safetensors`` files, keyed ``file/name``."""
    from safetensors.torch import load_file

    return {f"{f.name}/{name}": t for f in sorted(ckpt.glob("mp_rank_*.safetensors"))
            for name, t in load_file(str(f)).items()}


def hf_tensors(ckpt: Path) -> dict[str, "torch.Tensor"]:
    """The checkpoint as full (unsharded) HF-named tensors, whatever TP layout wrote it."""
    from megatron_prism.models.conversion.convert import layout_maps
    from megatron_prism.models.conversion.megatron_format import MegatronWeights
    from megatron_prism.models.qwen3vl.config import read_hf_config

    maps = layout_maps(read_hf_config(ckpt / "hf"), 1)
    weights = MegatronWeights(ckpt, maps)
    return {n: weights.hf_tensor(n).clone() for m in maps if m.megatron in weights.weight_map for n in m.hf}
