"""The `prism` command: `prism run` records the resolved config and walks the stages; config
mistakes are one clear line on stderr, not a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_prism.cli import main
from megatron_prism.config import load_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "configs" / "tiny.yaml"

STAGE_LINES = [
    "stage SFT: not yet implemented (lands with issue 6)",
    "stage WARMUP: not yet implemented (lands with issue 7)",
    "stage ALIGN: not yet implemented (lands with issue 7)",
    "stage RLVR: not yet implemented (lands with issue 6)",
    "stage EVAL: not yet implemented (lands with issue 6)",
]


def _prism(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "megatron_prism.cli", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )


def test_run_writes_resolved_config_and_walks_stages(tmp_path, capsys):
    out_dir = tmp_path / "run"
    rc = main(["run", str(TINY), f"run.output_dir={out_dir}", "optim.lr=1e-6", "stages.sft.steps=7"])
    assert rc == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("stage ")] == STAGE_LINES

    written = yaml.safe_load((out_dir / "config.yaml").read_text())
    assert written["optim"]["lr"] == 1e-6
    assert written["stages"]["sft"]["steps"] == 7
    assert written["run"]["output_dir"] == str(out_dir)
    assert load_config(out_dir / "config.yaml", []) == load_config(
        TINY, [f"run.output_dir={out_dir}", "optim.lr=1e-6", "stages.sft.steps=7"]
    )


def test_disabled_stages_print_nothing(tmp_path, capsys):
    rc = main(["run", str(TINY), f"run.output_dir={tmp_path}", "stages.warmup.enabled=false", "stages.align.enabled=false"])
    assert rc == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("stage ")] == [STAGE_LINES[0], STAGE_LINES[3], STAGE_LINES[4]]
    assert "stages disabled or absent: warmup, align" in out


def test_run_as_a_process(tmp_path):
    proc = _prism("run", str(TINY), f"run.output_dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr
    assert [line for line in proc.stdout.splitlines() if line.startswith("stage ")] == STAGE_LINES
    assert (tmp_path / "config.yaml").is_file()


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.lrr=1e-6", "unknown key 'optim.lrr' in override 'optim.lrr=1e-6' (config {tiny}); did you mean 'optim.lr'?"),
        ("parallel.tp=two", "key 'parallel.tp' in override 'parallel.tp=two' (config {tiny}) expects int, got str 'two'"),
        ("optim.lr", "override 'optim.lr' is not of the form key=value (for example optim.lr=1e-6)"),
    ],
)
def test_bad_override_is_one_line_on_stderr(tmp_path, override, message):
    proc = _prism("run", str(TINY), f"run.output_dir={tmp_path / 'never'}", override)
    assert proc.returncode == 2
    assert proc.stderr == f"prism: error: {message.format(tiny=TINY)}\n"
    assert "Traceback" not in proc.stderr
    assert "stage " not in proc.stdout
    assert not (tmp_path / "never").exists()


def test_missing_config_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_convert_delegates_to_the_conversion_functions(monkeypatch, tmp_path, capsys):
    import megatron_prism.models.conversion as conversion

    calls = []
    monkeypatch.setattr(conversion, "convert_hf_to_megatron", lambda *a, **k: calls.append(("h2m", a, k)) or tmp_path / "m")
    monkeypatch.setattr(conversion, "convert_megatron_to_hf", lambda *a, **k: calls.append(("m2h", a, k)) or tmp_path / "h")
    assert main(["convert", "hf-to-megatron", "--hf-dir", "H", "--out", "M", "--tp", "2", "--pp", "2"]) == 0
    assert main(["convert", "megatron-to-hf", "--megatron-dir", "M", "--out", "H2"]) == 0
    assert calls == [("h2m", ("H", "M"), {"tp": 2, "pp": 2}), ("m2h", ("M", "H2"), {})]
    assert "written to" in capsys.readouterr().out


def test_convert_reports_checkpoint_errors_without_traceback(tmp_path, capsys):
    # The real conversion on a directory that is not a checkpoint: one line, exit 2.
    rc = main(["convert", "hf-to-megatron", "--hf-dir", str(tmp_path / "nope"), "--out", str(tmp_path / "m")])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("prism: error: ") and "nope/config.json: no config.json" in err
    assert "Traceback" not in err and not (tmp_path / "m").exists()


def test_convert_rejects_non_positive_sizes(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["convert", "hf-to-megatron", "--hf-dir", "H", "--out", "M", "--tp", "0"])
    assert exc.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err
