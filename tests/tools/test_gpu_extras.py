"""The GPU extras of setup.py install: each resolves with pip's resolver, and pins what the pinned
engine itself pins.

Offline part: the extras read from setup.py (run with ``setuptools.setup`` captured, so the test
sees the file as it is now) are one engine each, exactly pinned, without flash-attn, with the
Transformer Engine range megatron-core's installed metadata asks for, and a python_requires the
engines accept.

Online part (PyPI, every call with a timeout): ``pip install --dry-run --no-deps --only-binary
:all:`` for Linux x86-64 / CPython 3.11 resolves each extra's requirements to real
distributions (nothing is installed), and the resolved engine's own metadata (pip's
``--report``) pins the same torch and admits the same transformers as the extra does.
"""

from __future__ import annotations

import importlib.metadata
import json
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import setuptools
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[2]
ENGINES = {"sglang": "0.5.23", "vllm": "0.33.0"}
PIP_TIMEOUT_S = 240
# Linux x86-64 wheels as the engines publish them (sglang: manylinux_2_34, vllm and torch:
# manylinux_2_28); pip of this age does not widen an explicit --platform to older glibc tags.
PLATFORMS = [arg for tag in ("manylinux_2_34_x86_64", "manylinux_2_28_x86_64", "manylinux2014_x86_64")
             for arg in ("--platform", tag)]


@pytest.fixture(scope="module")
def setup_kwargs(monkeypatch_module) -> dict:
    seen: dict = {}
    monkeypatch_module.setattr(setuptools, "setup", lambda **kw: seen.update(kw))
    monkeypatch_module.chdir(REPO)
    runpy.run_path(str(REPO / "setup.py"), run_name="__main__")
    return seen


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def _reqs(kw: dict, extra: str) -> dict[str, Requirement]:
    return {Requirement(r).name.lower(): Requirement(r) for r in kw["extras_require"][extra]}


def _pinned(req: Requirement) -> str:
    (spec,) = req.specifier
    assert spec.operator == "==", f"{req} is not an exact pin"
    return spec.version


def test_each_engine_extra_is_pinned_and_flash_attn_is_gone(setup_kwargs):
    extras = setup_kwargs["extras_require"]
    assert "gpu" not in extras  # one engine per environment: sglang and vllm pin different torches
    every = [r for reqs in extras.values() for r in reqs] + setup_kwargs["install_requires"]
    assert not [r for r in every if Requirement(r).name.lower().replace("_", "-") == "flash-attn"]
    for engine, version in ENGINES.items():
        reqs = _reqs(setup_kwargs, engine)
        assert _pinned(reqs[engine]) == version
        assert _pinned(reqs["torch"])  # the engine's torch, exactly
        assert "transformers" in reqs
    base = {Requirement(r).name.lower(): Requirement(r) for r in setup_kwargs["install_requires"]}
    for engine in ENGINES:  # the extra's transformers must lie inside the base range (<5.25 stays)
        pins = [s.version for s in _reqs(setup_kwargs, engine)["transformers"].specifier if s.operator in ("==", ">=")]
        assert pins and all(base["transformers"].specifier.contains(p) for p in pins)
    assert SpecifierSet(setup_kwargs["python_requires"]).contains("3.11")
    assert not SpecifierSet(setup_kwargs["python_requires"]).contains("3.10")  # sglang 0.5.23 needs >= 3.11


def test_transformer_engine_range_is_megatron_cores_own(setup_kwargs):
    (te,) = _reqs(setup_kwargs, "te").values()
    assert te.name == "transformer-engine" and "pytorch" in te.extras
    wanted = [Requirement(r) for r in importlib.metadata.requires("megatron-core") or []
              if Requirement(r).name == "transformer-engine"]
    assert wanted, "megatron-core's metadata names no transformer-engine"
    theirs = wanted[0].specifier
    for probe in ("2.8.0", "2.9.0", "2.11.0", "2.12.0"):
        assert te.specifier.contains(probe) == theirs.contains(probe, prereleases=True), probe


def _dry_run_cmd(requirements: list[str], where: Path) -> list[str]:
    return [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed", "--quiet",
            "--only-binary", ":all:", *PLATFORMS, "--python-version", "3.11", "--implementation", "cp",
            "--target", str(where / "never-written"), "--timeout", "30", "--retries", "1",
            "--report", str(where / "report.json"), *requirements]


@pytest.fixture(scope="module")
def resolved(setup_kwargs, tmp_path_factory) -> dict[str, dict[str, dict]]:
    """Per extra: pip's resolution of its requirements (the three pip runs go at once)."""
    runs = {}
    for extra in (*ENGINES, "te"):
        reqs = [str(r) for r in _reqs(setup_kwargs, extra).values()]
        where = tmp_path_factory.mktemp(f"pip-{extra}")
        runs[extra] = (reqs, where, subprocess.Popen(_dry_run_cmd(reqs, where), stdout=subprocess.DEVNULL,
                                                     stderr=subprocess.PIPE, text=True))
    out = {}
    for extra, (reqs, where, proc) in runs.items():
        try:
            _, err = proc.communicate(timeout=PIP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise AssertionError(f"pip did not resolve [{extra}] within {PIP_TIMEOUT_S} s") from None
        assert proc.returncode == 0, f"pip could not resolve [{extra}] = {reqs}:\n{err[-3000:]}"
        report = json.loads((where / "report.json").read_text())
        out[extra] = {i["metadata"]["name"].lower().replace("_", "-"): i["metadata"] for i in report["install"]}
    return out


@pytest.mark.parametrize("engine", sorted(ENGINES))
def test_engine_extra_resolves_and_agrees_with_the_engines_metadata(engine, setup_kwargs, resolved):
    reqs = _reqs(setup_kwargs, engine)
    got = resolved[engine]
    assert set(got) == set(reqs)  # every requirement found a distribution
    theirs = {Requirement(r).name.lower(): Requirement(r) for r in got[engine].get("requires_dist", [])
              if "extra ==" not in r}
    assert theirs["torch"].specifier.contains(got["torch"]["version"]), (theirs["torch"], got["torch"])
    assert theirs["transformers"].specifier.contains(got["transformers"]["version"])
    assert got[engine]["version"] == ENGINES[engine]


def test_te_extra_resolves(setup_kwargs, resolved):
    (te,) = _reqs(setup_kwargs, "te").values()
    assert te.specifier.contains(resolved["te"]["transformer-engine"]["version"])
