"""``prism run`` as a real subprocess (optionally under torchrun) for the pipeline tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
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


def kill_at(point: str, run_dir: Path, overrides: list[str], *, nproc: int = 1, timeout: float = 240.0) -> None:
    """Start ``prism run`` with ``PRISM_PAUSE_AT=point`` (``name@k``: the process writes
    ``PRISM_PAUSE_MARKER`` at the k-th hit of the pause point ``name`` of
    ``megatron_prism.training.faults`` and waits there), then SIGKILL its whole process group
    (torchrun and every rank when ``nproc`` > 1)."""
    marker = run_dir.parent / f"paused-{point}"
    env = prism_env(PRISM_PAUSE_AT=point, PRISM_PAUSE_MARKER=str(marker), PRISM_PAUSE_SECONDS="120")
    log = open(run_dir.parent / f"killed-{point}.log", "w")
    proc = subprocess.Popen(prism_argv(run_dir, *overrides, nproc=nproc), cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + timeout
        while not marker.exists():
            assert proc.poll() is None, f"prism run ended (rc {proc.returncode}) before reaching {point}"
            assert time.monotonic() < deadline, f"{point} not reached in {timeout} s"
            time.sleep(0.05)
        # torchrun starts each rank in a session of its own, out of reach of killpg: all of them
        ranks = _descendants(proc.pid)
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
        _wait_gone(ranks)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie has released its files already)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _wait_gone(pids: list[int], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while any(_alive(pid) for pid in pids):
        assert time.monotonic() < deadline, f"ranks {pids} still alive {timeout} s after SIGKILL"
        time.sleep(0.05)


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
