"""Faults from outside on real ``prism run`` subprocesses of the whole pipeline (the tiny embedded
model; SFT, WARMUP, ALIGN and RLVR, a few steps each, a checkpoint after every step, held-out
evaluations before and after each stage), then divergence.

The faulted sequence, on one run directory:

1. two runs at once: one takes the lock, the other refuses in one line naming the holder;
2. for each stage in order, the run in progress is SIGKILLed at a random moment of that stage: a
   uniform fraction of the stage's span in the uninterrupted run's timeline (from the line that
   starts it to the next stage's: building, evaluations, steps, checkpoint writes, the stage's end),
   counted from the line that starts it in the faulted run; the next run takes the lock the dead
   one left (an OS lock) and resumes;
3. in one drawn stage, SIGTERM (Slurm's preemption) comes first, at a random moment, and the
   stage's SIGKILL a random part of its span later (Slurm's KillWait, cut short) unless the run
   has saved and said it stopped by then: exit 75 in one line, or a kill inside the preemption's
   step or save. After a 75, one random file of the stopped stage's newest checkpoint is garbled
   in place (same size) when it has an earlier one, and a rerun must pass over it in one line;
4. after the kill of a drawn stage (not the last), SIGUSR1 (Slurm's ``--signal=USR1@...``)
   during the last step of the first stage that has one to take (the seam ``PRISM_PAUSE_AT`` holds
   the process there until the signal comes): exit 75 in one line naming the checkpoint of that
   step, and the rerun resumes at the last step and must still report the stage's final figures
   and evaluations;
5. the last rerun finishes. Every figure of report.json and the final weights (every stage's latest
   checkpoint, policy and discriminator, and the trainer state beside them) must equal the
   uninterrupted run's bit for bit.

Random draws come from ``PRISM_FAULT_SEED`` (default: random), printed so that a failure can be
replayed (the moments replay; where they land depends on the machine's speed, which is printed).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from tests.pipeline.prism_proc import ROOT, prism_argv, prism_env, report_figures, shard_tensors

STAGES = ("sft", "warmup", "align", "rlvr")
STEPS = {"sft": 4, "warmup": 2, "align": 2, "rlvr": 2}
# The seam point each stage passes once per step (after its optimizer step, before the step is
# counted and saved; ALIGN/RLVR: one policy mini-batch per step here).
STEP_POINT = {"sft": "sft.step", "warmup": "warmup.step", "align": "align.update", "rlvr": "rlvr.update"}
POLICY_STAGES = ("sft", "align", "rlvr")  # their checkpoints/ hold the policy (WARMUP's: the discriminator)
PIPELINE = ["stages.warmup.enabled=true", "stages.align.enabled=true", "stages.eval.enabled=false",
            "data.synth_sizes=sft=16,align=8,rl=4,eval=4", "optim.warmup_steps=0", "parallel.micro_batch_size=2",
            "rollout.n=4", "rollout.max_new_tokens=32",
            "stages.warmup.rollout.max_new_tokens=64", "stages.align.rollout.max_new_tokens=64",
            "align.samples_per_prompt=4", "run.log_every=1",
            *(f"stages.{s}.steps={n}" for s, n in STEPS.items()), *(f"stages.{s}.save_every=1" for s in STAGES),
            "stages.sft.global_batch_size=2", "stages.warmup.global_batch_size=2",
            "stages.align.global_batch_size=1", "stages.rlvr.global_batch_size=2",
            "stages.sft.eval_every=100", "stages.align.eval_every=100", "stages.rlvr.eval_every=100"]
SFT_ONLY = ["stages.rlvr.enabled=false", "stages.eval.enabled=false", "data.synth_sizes=sft=16,align=4,rl=4,eval=4",
            "stages.sft.steps=6", "stages.sft.global_batch_size=2", "stages.sft.save_every=1",
            "stages.sft.eval_every=0", "optim.warmup_steps=0"]
STARTING = re.compile(r"^\[prism\] stage (\w+): starting", re.M)
PREEMPTED = re.compile(r"^prism: preempted: stage (\w+) stopped after step (\d+) \(checkpoint (\S+)\); rerun the "
                       r"same command to resume \(exit 75: requeue\)$", re.M)


def _seed() -> int:
    seed = int(os.environ.get("PRISM_FAULT_SEED", random.randrange(2**31)))
    print(f"fault-injection seed: PRISM_FAULT_SEED={seed}")
    return seed


def _start(run_dir: Path, log: Path, *extra: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(prism_argv(run_dir, *PIPELINE, *extra), cwd=ROOT, env=prism_env(**env),
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict[str, float]]:
    """The uninterrupted run, and its timeline: each stage's span in seconds (from its starting
    line to the next stage's, the last one's to the report line)."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = subprocess.Popen(prism_argv(run_dir, *PIPELINE), cwd=ROOT, env=prism_env(PYTHONUNBUFFERED="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    timer = threading.Timer(300, proc.kill)
    timer.start()
    marks, out = {}, []
    for line in proc.stdout:
        out.append(line)
        if m := STARTING.match(line):
            marks[m.group(1)] = time.monotonic()
        elif line.startswith("[prism] report:"):
            marks["end"] = time.monotonic()
    timer.cancel()
    assert proc.wait() == 0, "".join(out)[-3000:]
    ends = [*STAGES[1:], "end"]
    spans = {s: marks[e] - marks[s] for s, e in zip(STAGES, ends)}
    print("uninterrupted run's stage spans: " + ", ".join(f"{s} {t:.1f} s" for s, t in spans.items()))
    return run_dir, spans


def _verifies(ckpt: Path) -> bool:
    """What a resume checks: COMPLETE.json lists every file with its size and sha256."""
    try:
        files = json.loads((ckpt / "COMPLETE.json").read_text())["files"]
        return all(hashlib.sha256((ckpt / name).read_bytes()).hexdigest() == entry["sha256"]
                   for name, entry in files.items())
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _resume_step(run_dir: Path, stage: str) -> int:
    """The step a rerun resumes ``stage`` at: its newest checkpoint that verifies."""
    steps = [int(p.name[5:]) for p in (run_dir / stage / "checkpoints").glob("step_*") if _verifies(p)]
    return max(steps, default=0)


def _unfinished(run_dir: Path, stages) -> list[str]:
    return [s for s in stages if not (run_dir / s / "result.json").is_file()]


def _signal_in_stage(proc: subprocess.Popen, log: Path, stages, fraction: float, spans: dict[str, float],
                     sig: int) -> tuple[str | None, str]:
    """Waits for the line that starts the first of ``stages`` this process reaches, then sends
    ``sig`` ``fraction`` of that stage's span later. Returns that stage (None when the run ended
    first) and what happened, for the record."""
    deadline = time.monotonic() + 240
    while True:
        started = [s for s in STARTING.findall(log.read_text(errors="replace")) if s in stages]
        if started:
            break
        if proc.poll() is not None:
            assert proc.returncode == 0, f"run ended (rc {proc.returncode}):\n{log.read_text()[-3000:]}"
            return None, "the run finished before any of " + "/".join(stages)
        assert time.monotonic() < deadline, f"no stage of {stages} started in 240 s"
        time.sleep(0.05)
    delay = fraction * spans[started[0]]
    time.sleep(delay)
    if proc.poll() is not None:
        return None, f"{started[0]} + {delay:.2f} s: the run had ended (rc {proc.returncode})"
    lines = log.read_text(errors="replace").splitlines()
    os.killpg(proc.pid, sig)
    return started[0], f"{started[0]} + {delay:.2f} s, after {lines[-1][:90] if lines else 'no output'!r}"


def _said_stopped(log: Path) -> bool:
    """The run saved its step and printed its preemption line (it is on its way out with 75)."""
    return "prism: preempted:" in log.read_text(errors="replace")


def _one_preempted_line(log_text: str) -> tuple[str, int, Path]:
    lines = PREEMPTED.findall(log_text)
    assert len(lines) == 1 and "Traceback" not in log_text, log_text[-3000:]
    stage, step, checkpoint = lines[0]
    assert (Path(checkpoint) / "COMPLETE.json").is_file() and Path(checkpoint).name == f"step_{int(step):08d}"
    return stage, int(step), Path(checkpoint)


def _final_weights(run_dir: Path) -> dict[str, str]:
    """sha256 of every tensor of every stage's latest checkpoint (policy and discriminator)."""
    out = {}
    for latest in sorted(run_dir.glob("*/*checkpoints/latest")):
        ckpt = latest.parent / latest.read_text().strip()
        out[f"{latest.parent.relative_to(run_dir)}/latest"] = ckpt.name
        for shards in sorted({p.parent for p in ckpt.rglob("mp_rank_*.safetensors")}):
            for name, t in shard_tensors(shards).items():
                data = t.contiguous().view(-1).view(dtype=torch.uint8).numpy().tobytes()
                out[f"{shards.relative_to(run_dir)}/{name}"] = hashlib.sha256(data).hexdigest()
        # the state a resume reads (loader position, figures, ...), paths made relative to the run
        state = (ckpt / "trainer_state.json").read_text().replace(str(run_dir), "RUN")
        out[f"{ckpt.relative_to(run_dir)}/trainer_state.json"] = state
    return out


def test_random_kills_in_every_stage_usr1_term_garble_then_resume_bit_exact(reference, tmp_path):
    ref_dir, spans = reference
    rng = random.Random(_seed())
    # Every draw up front, in a fixed order, so that a seed replays the same moments.
    kill_at = {s: rng.random() for s in STAGES}
    # SIGUSR1 after the kill of SFT, WARMUP or ALIGN: a later stage always has a last step to take
    usr1_stage, term_stage = rng.choice(STAGES[:-1]), rng.choice(STAGES)
    term_at, garble_pick, garble_where, garble_bytes = rng.random(), rng.random(), rng.random(), rng.randbytes(64)
    print(f"kill fractions {({s: round(f, 3) for s, f in kill_at.items()})}; SIGUSR1 at the last step after "
          f"{usr1_stage}'s kill; SIGTERM at {term_at:.3f} of {term_stage}, its kill after that")
    run_dir, passed_over = tmp_path / "run", None
    attempt = iter(range(100))

    def log_path(what: str) -> Path:
        return tmp_path / f"{next(attempt):02d}-{what}.log"

    def note(event: str) -> None:  # printed as it happens: a failure's output shows the faults before it
        print(event, flush=True)

    # The task and the tiny model the uninterrupted run generated (the same bytes this run would
    # generate: they are seeded), so that the faulted runs spend their time on the stages.
    inputs = [f"data.root={ref_dir / 'data'}", f"model.hf_dir={ref_dir / 'tiny_model'}"]

    def start(log: Path, **env: str) -> subprocess.Popen:
        return _start(run_dir, log, *inputs, **env)

    # 1. Two runs on one directory at once: one refuses in one line naming the holder.
    logs = [log_path(f"first{i}") for i in range(2)]
    runs = [start(log) for log in logs]
    deadline = time.monotonic() + 240
    while all(r.poll() is None for r in runs):
        assert time.monotonic() < deadline, "neither run refused"
        time.sleep(0.05)
    loser = next(i for i, r in enumerate(runs) if r.poll() is not None)
    proc, log, refused = runs[1 - loser], logs[1 - loser], logs[loser].read_text()
    assert runs[loser].returncode == 2, refused[-2000:]
    refusal = [ln for ln in refused.splitlines() if ln.startswith("prism: error:")]
    assert len(refusal) == 1 and "in use by another prism run" in refusal[0] and f"pid {proc.pid}" in refusal[0]
    assert "Traceback" not in refused

    for stage in STAGES:
        later = STAGES[STAGES.index(stage):]
        if proc is None:
            log = log_path(f"run-{stage}")
            proc = start(log)
        if stage != term_stage:
            # 2. SIGKILL at a random moment of this stage (or of the first later one this run reaches).
            _, what = _signal_in_stage(proc, log, later, kill_at[stage], spans, signal.SIGKILL)
        else:
            # 3. SIGTERM (Slurm's preemption) at a random moment, and this stage's SIGKILL a random
            #    part of its span after it (Slurm's KillWait, cut short) unless the run has saved
            #    and said it stopped by then: 75 in one line, or a kill inside the preemption's
            #    step or save (or 0: the SIGTERM came too late to matter).
            reached, what = _signal_in_stage(proc, log, later, term_at, spans, signal.SIGTERM)
            if reached is not None:
                delay = kill_at[stage] * spans[reached]
                deadline = time.monotonic() + delay
                while time.monotonic() < deadline and proc.poll() is None and not _said_stopped(log):
                    time.sleep(0.05)
                if proc.poll() is None and not _said_stopped(log):
                    os.killpg(proc.pid, signal.SIGKILL)
                    what += f", SIGKILL {delay:.2f} s later"
        rc = proc.wait(timeout=120)
        if rc == -signal.SIGTERM and "[prism] report:" in log.read_text(errors="replace"):
            # The SIGTERM came after the run had written its report, during the interpreter's own
            # teardown (CPython restores the default handlers there): the work is complete, and a
            # requeue finds every stage finished. As good as 0.
            what += " (after the report: during interpreter teardown)"
            rc = 0
        note(f"{'SIGTERM' if stage == term_stage else 'SIGKILL'} {what} -> rc {rc}")
        assert rc in (0, -signal.SIGKILL, *((75,) if stage == term_stage else ())), log.read_text()[-3000:]
        proc = None
        if rc == 0:
            break
        if rc == 75:
            # A garbled newest checkpoint (one random file, same size) of the stage the SIGTERM
            # stopped, when it has an earlier one to fall back to.
            stopped, _, newest = _one_preempted_line(log.read_text())
            if stopped in POLICY_STAGES and len(list(newest.parent.glob("step_*"))) > 1:
                files = sorted(json.loads((newest / "COMPLETE.json").read_text())["files"])
                victim = newest / files[int(garble_pick * len(files))]
                data = bytearray(victim.read_bytes())
                n = min(64, len(data))
                at = int(garble_where * (len(data) - n + 1))
                data[at:at + n] = bytes(b ^ 0xFF if b == o else b for b, o in zip(garble_bytes[:n], data[at:at + n]))
                victim.write_bytes(bytes(data))
                passed_over = (newest.name, len(list(tmp_path.glob("*.log"))))
                note(f"garbled {victim.relative_to(run_dir)} at byte {at}")

        if stage == usr1_stage:
            # 4. SIGUSR1 during the last step of the first stage that still has one to take.
            todo = [s for s in _unfinished(run_dir, later) if _resume_step(run_dir, s) < STEPS[s]]
            if todo:
                target = todo[0]
                hits, marker = STEPS[target] - _resume_step(run_dir, target), tmp_path / "paused"
                marker.unlink(missing_ok=True)
                log = log_path(f"usr1-{target}")
                proc = start(log, PRISM_PAUSE_AT=f"{STEP_POINT[target]}@{hits}",
                             PRISM_PAUSE_MARKER=str(marker), PRISM_PAUSE_SECONDS="120")
                deadline = time.monotonic() + 240
                while not marker.exists():
                    assert proc.poll() is None, f"rc {proc.returncode} before the pause:\n{log.read_text()[-3000:]}"
                    assert time.monotonic() < deadline, "the last step's pause point was not reached"
                    time.sleep(0.05)
                os.killpg(proc.pid, signal.SIGUSR1)
                rc = proc.wait(timeout=120)
                assert rc == 75, log.read_text()[-3000:]
                got = _one_preempted_line(log.read_text())
                assert got[:2] == (target, STEPS[target]), got
                note(f"SIGUSR1 at {target}'s last step -> rc 75, {got[2].name}")
                proc = None

    # 5. The last rerun finishes, whatever state the faults left.
    last = subprocess.run(prism_argv(run_dir, *PIPELINE, *inputs), cwd=ROOT, env=prism_env(), capture_output=True,
                          text=True, timeout=300)
    assert last.returncode == 0, last.stdout[-2000:] + last.stderr[-3000:]
    if passed_over:  # said by the first run after the garble that got as far as the stage's resume
        name, before = passed_over
        after = "".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("*.log"))[before:]) + last.stdout
        assert f"checkpoint {name} does not verify, passed over" in after, after[-3000:]
    assert not list(run_dir.glob("*/*checkpoints/.tmp-*"))

    ref_weights, got_weights = _final_weights(ref_dir), _final_weights(run_dir)
    assert ref_weights.keys() == got_weights.keys()
    differ = [k for k in ref_weights if ref_weights[k] != got_weights[k]]
    assert not differ, f"{len(differ)} of {len(ref_weights)} differ after the faults, e.g. {differ[:3]}"
    ref_figures, got_figures = report_figures(ref_dir), report_figures(run_dir)
    assert [s["stage"] for s in got_figures] == list(STAGES)
    # as JSON text: NaN figures (an accuracy over no valid response) compare equal to themselves
    assert json.dumps(got_figures, sort_keys=True) == json.dumps(ref_figures, sort_keys=True)


def test_divergence_saves_no_poison_and_exits_3(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(prism_argv(run_dir, *SFT_ONLY, "stages.sft.lr=1e30", "optim.clip_grad=0"), cwd=ROOT,
                          env=prism_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("prism: error:")]
    assert len(errors) == 1 and "training diverged: stage sft" in errors[0], proc.stderr[-2000:]
    assert "newest healthy checkpoint: " + str(run_dir / "sft" / "checkpoints" / "step_00000001") in errors[0]
    assert "Traceback" not in proc.stderr
    steps = sorted(p.name for p in (run_dir / "sft" / "checkpoints").glob("step_*"))
    assert steps == ["step_00000001"]  # the skip streak's steps were not saved
    assert all(torch.isfinite(t).all() for t in shard_tensors(run_dir / "sft" / "checkpoints" / steps[0]).values())
