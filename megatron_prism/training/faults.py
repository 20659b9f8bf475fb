"""A test seam for crash tests: named points where a process can be made to stop and wait.

``pause_point(name)`` does nothing unless the environment variable ``PRISM_PAUSE_AT`` names this
point: ``PRISM_PAUSE_AT=name`` pauses at its first hit, ``PRISM_PAUSE_AT=name@k`` at its k-th hit
(counted in this process). There it writes the marker file ``PRISM_PAUSE_MARKER`` (if set) and
sleeps up to ``PRISM_PAUSE_SECONDS`` (default 60) so that a test can SIGKILL the process at exactly
that point; if nobody does, it carries on, at once when a stop was requested meanwhile (a test that
sends SIGUSR1/SIGTERM at the point need not wait out the pause). Points used by the stages:

    sft.step          SFT, after an optimizer step, before the step is counted and saved
    rlvr.rollout      RLVR, after the engine returned a round of rollouts
    rlvr.update       RLVR, after a mini-batch's backward, before its optimizer step
    warmup.step       WARMUP, after the discriminator's optimizer step, before it is counted and saved
    align.update      ALIGN, after a policy mini-batch's backward (the discriminator has already
                      stepped), before the policy's optimizer step
    checkpoint.write  checkpoint save, after the model shard and rank_*.pt are in the temporary
                      directory, before the manifest, COMPLETE.json and the rename
"""

from __future__ import annotations

import os
import time
from pathlib import Path

_hits: dict[str, int] = {}


def pause_point(name: str) -> None:
    spec = os.environ.get("PRISM_PAUSE_AT")
    if not spec:
        return
    target, _, count = spec.partition("@")
    if target != name:
        return
    _hits[name] = _hits.get(name, 0) + 1
    if _hits[name] != (int(count) if count else 1):
        return
    marker = os.environ.get("PRISM_PAUSE_MARKER")
    if marker:
        Path(marker).write_text(f"{name} hit {_hits[name]} pid {os.getpid()}\n")
    from megatron_prism.training import preemption

    deadline = time.monotonic() + float(os.environ.get("PRISM_PAUSE_SECONDS", "60"))
    while time.monotonic() < deadline and not preemption.requested():
        time.sleep(0.05)
