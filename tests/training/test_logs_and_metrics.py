"""Logs a cluster user can read: greppable step lines off a terminal, a tqdm bar on one, third-party
warnings once; metrics named by run.name / run.project / run.tags with the resolved config, in
TensorBoard and W&B."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_prism.config import config_to_dict, load_config
from megatron_prism.console import format_duration
from megatron_prism.training.metrics import MetricsLogger, StepProgress, compact

ROOT = Path(__file__).resolve().parents[2]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_one_greppable_line_every_n_steps():
    out = io.StringIO()
    bar = StepProgress("sft", 7, 0, every=3, stream=out, enabled=True)
    for step in range(7):
        bar.step({"loss": 0.71 - 0.01 * step, "lr": 1.9e-3, "throughput/tokens_per_s": 4100.4, "grad_norm": 1.5,
                  "time/train_s": 0.2})
    bar.close()
    lines = out.getvalue().splitlines()
    assert [int(re.match(r"\[sft\] step (\d+)/7 ", line).group(1)) for line in lines] == [1, 3, 6, 7]
    assert re.fullmatch(r"\[sft\] step 3/7 loss 0\.69 grad 1\.5 lr 1\.9e-3 tok/s 4100 eta \d+s", lines[1]), lines[1]
    assert re.fullmatch(r"\[sft\] step 7/7 loss 0\.65 grad 1\.5 lr 1\.9e-3 tok/s 4100 done in \d+s", lines[-1])
    assert "\r" not in out.getvalue()


def test_a_resumed_stage_counts_from_where_it_resumed():
    out = io.StringIO()
    bar = StepProgress("rlvr", 40, 20, every=10, stream=out, enabled=True)
    for _ in range(20):
        bar.step({"reward/mean": 0.5, "reward/accuracy": 0.25})
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("[rlvr] step 21/40 reward 0.5 acc 0.25 eta ")
    assert [line.split()[2] for line in lines] == ["21/40", "30/40", "40/40"]


def test_on_a_terminal_a_tqdm_bar_and_no_step_lines():
    out = _Terminal()
    bar = StepProgress("align", 3, 0, stream=out, enabled=True)
    for _ in range(3):
        bar.step({"disc/caption/acc": 0.5, "loss": 1.0})
    bar.close()
    text = out.getvalue()
    assert "\r" in text and "cap_acc 0.5" in text and "[align] step" not in text


def test_other_ranks_print_nothing():
    out = io.StringIO()
    bar = StepProgress("sft", 2, 0, every=1, stream=out, enabled=False)
    bar.step({"loss": 1.0})
    assert out.getvalue() == ""


@pytest.mark.parametrize("seconds,text", [(8, "8s"), (70, "1m10s"), (3725, "1h02m"), (-1, "0s")])
def test_durations(seconds, text):
    assert format_duration(seconds) == text


def test_compact_figures():
    assert [compact(v) for v in (0.7134, 0.0019, 4100.4, 12.345, 0.0)] == ["0.713", "1.9e-3", "4100", "12.3", "0"]


def test_third_party_warnings_and_log_records_once_ours_in_full():
    code = """
import logging, warnings
from megatron_prism.console import configure_console
configure_console()
for stage in range(3):  # as every stage builds its model again
    warnings.warn_explicit("tp_group is None", DeprecationWarning, "megatron/core/layers.py", 10 + stage,
                           module="megatron.core.layers")
    warnings.warn_explicit("full scope is deprecated", UserWarning, "megatron/core/config.py", 5,
                           module="megatron.core.config")
    logging.getLogger("megatron.core.optimizer").warning("Skipping grad clip")
    logging.getLogger("megatron_prism.stages.sft").warning("stage %d: skipped 1 record", stage)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60,
                          env={**os.environ, "PYTHONWARNINGS": ""})
    err = proc.stderr
    assert proc.returncode == 0, err
    assert err.count("tp_group is None") == 1 and err.count("full scope is deprecated") == 1
    assert err.count("Skipping grad clip") == 1
    assert [f"stage {i}: skipped 1 record" in err for i in range(3)] == [True] * 3


def test_tensorboard_run_dir_is_the_run_name_with_the_resolved_config(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(ROOT / "examples/configs/tiny.yaml", [f"run.output_dir={tmp_path}", "run.name=grpo-lr1e-6",
                                                            "run.tags=[tiny, grpo]"])
    logger = MetricsLogger.for_run(cfg, tmp_path)
    logger.log("sft", 1, {"loss": 2.0})
    logger.log("sft", 2, {"loss": 1.5})
    logger.close()
    run_dir = tmp_path / "tensorboard" / "grpo-lr1e-6"
    events = EventAccumulator(str(run_dir), size_guidance={"tensors": 0, "scalars": 0})
    events.Reload()
    assert [e.value for e in events.Scalars("sft/loss")] == [2.0, 1.5]
    config_text = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "grpo-lr1e-6" in config_text and "output_dir: " + str(tmp_path) in config_text
    assert (tmp_path / "metrics.jsonl").read_text().count('"stage": "sft"') == 2
    unnamed = MetricsLogger(tmp_path / "run-b", "tensorboard")
    unnamed.close()
    assert (tmp_path / "run-b" / "tensorboard" / "run-b").is_dir()  # default: the output directory's name


def test_wandb_run_has_project_name_tags_and_config_and_resumes_the_same_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = load_config(ROOT / "examples/configs/tiny.yaml", [f"run.output_dir={tmp_path}", "run.logger=wandb",
                                                            "run.project=prism-tests", "run.name=seed0",
                                                            "run.tags=[tiny, grpo]"])
    logger = MetricsLogger.for_run(cfg, tmp_path)
    run = logger._wandb
    assert (run.project, run.name, tuple(run.tags)) == ("prism-tests", "seed0", ("tiny", "grpo"))
    assert run.config["run"]["name"] == "seed0" and run.config["optim"] == config_to_dict(cfg)["optim"]
    logger.log("sft", 2, {"loss": 1.0})
    logger.log("rlvr", 1, {"reward/mean": 0.5})  # each stage restarts its steps: no W&B step conflict
    first_id = run.id
    logger.close()
    again = MetricsLogger.for_run(cfg, tmp_path)
    assert again._wandb.id == first_id  # a resumed prism run continues its W&B run
    again.close()
