"""The config layer: YAML + dotted overrides into typed dataclasses, with errors a user can act on."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from megatron_prism.config import (
    STAGE_ORDER,
    ConfigError,
    PrismConfig,
    config_from_dict,
    config_to_dict,
    dump_config,
    load_config,
    parse_override,
)

TINY = Path(__file__).resolve().parents[2] / "examples" / "configs" / "tiny.yaml"


def _stage(out: str, **kw) -> dict:
    return {"steps": 3, "global_batch_size": 2, "save_every": 3, "eval_every": 1, "output_dir": out,
            "data_path": None, "lr": None, **kw}


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_tiny_example_loads_with_every_stage_in_order():
    cfg = load_config(TINY, [])
    assert (cfg.parallel.tp, cfg.parallel.pp) == (1, 1)
    assert cfg.rollout.engine == "embedded"
    # the embedded default runs the whole PRISM pipeline
    assert list(cfg.stages) == list(STAGE_ORDER)
    assert [s.name for s in cfg.enabled_stages()] == list(STAGE_ORDER)
    assert cfg.run.output_dir == "outputs/tiny"


def test_round_trip_dict_config_dict():
    raw = {
        "model": {"dtype": "bfloat16", "recompute": "selective"},
        "parallel": {"tp": 2, "vpp": 2, "sequence_parallel": True},
        "optim": {"lr": 3, "schedule": "cosine"},  # an int for a float field becomes a float
        "algorithm": {"clip_high": 0.28},
        # written out of pipeline order: the config puts stages in STAGE_ORDER
        "stages": {"rlvr": _stage("o/rlvr", optim={"warmup_steps": 1}, algorithm={"loss": "gspo"}),
                   "sft": _stage("o/sft", enabled=False)},
        "run": {"output_dir": "o", "logger": "none"},
    }
    cfg = config_from_dict(raw)
    assert cfg.optim.lr == 3.0 and isinstance(cfg.optim.lr, float)
    assert list(cfg.stages) == ["sft", "rlvr"]
    assert cfg.stages["rlvr"].name == "rlvr"
    assert [s.name for s in cfg.enabled_stages()] == ["rlvr"]
    out = config_to_dict(cfg)
    for section, values in raw.items():
        if section != "stages":
            assert {k: out[section][k] for k in values} == values
    assert out["stages"]["sft"] == {"name": "sft", "enabled": False, **_stage("o/sft"), "optim": None,
                                    "rollout": None, "algorithm": None}
    # a stage's section is kept as written (the keys it sets), not resolved
    assert out["stages"]["rlvr"]["optim"] == {"warmup_steps": 1} and out["stages"]["rlvr"]["algorithm"] == {"loss": "gspo"}
    assert config_to_dict(config_from_dict(out)) == out
    assert config_from_dict(out) == cfg


def test_a_stage_runs_with_its_own_keys_over_the_run_wide_sections():
    from megatron_prism.experiments.arms import ALGORITHMS

    cfg = load_config(TINY, ["optim.lr=1e-6", *ALGORITHMS["gspo"], "stages.rlvr.rollout.max_new_tokens=40"])
    sft, align, rlvr = (cfg.for_stage(n) for n in ("sft", "align", "rlvr"))
    # SFT: the run-wide cosine with its warm-up, its own lr; ALIGN: constant, no warm-up (tiny.yaml)
    assert (sft.optim.lr, sft.optim.warmup_steps, sft.optim.schedule) == (2e-3, 10, "cosine")
    assert (align.optim.lr, align.optim.warmup_steps, align.optim.schedule) == (2e-4, 0, "constant")
    # `--algorithm gspo` reaches RLVR only; ALIGN keeps PPO clip 0.2 (one ALIGN checkpoint feeds every RL variant)
    assert (rlvr.algorithm.loss, align.algorithm.loss, sft.algorithm.loss) == ("gspo", "grpo", "grpo")
    assert (align.algorithm.clip_low, align.algorithm.clip_high) == (0.2, 0.2)
    assert (rlvr.rollout.max_new_tokens, align.rollout.max_new_tokens, cfg.rollout.max_new_tokens) == (40, 64, 64)
    # the view leaves the run-wide config as it was
    assert (cfg.optim.lr, cfg.algorithm.loss) == (1e-6, "grpo")


def test_a_stage_section_key_is_checked_against_the_run_wide_section():
    with pytest.raises(ConfigError, match=r"unknown key 'stages.align.optim.warmup_step' .*did you mean "
                                          r"'stages.align.optim.warmup_steps'"):
        load_config(TINY, ["stages.align.optim.warmup_step=1"])
    with pytest.raises(ConfigError, match=r"key 'stages.rlvr.algorithm.clip_low' .* expects float or null"):
        load_config(TINY, ["stages.rlvr.algorithm.clip_low=high"])
    with pytest.raises(ConfigError, match=r"unknown key 'stages.sft.discriminator_lr' in override"):
        load_config(TINY, ["stages.sft.discriminator_lr=1e-5"])


def test_dump_then_load_is_identity(tmp_path):
    cfg = load_config(TINY, ["optim.lr=1e-6", "optim.adam_eps=1e-12", "algorithm.clip_high=0.3",
                             "stages.rlvr.algorithm.loss=dapo"])
    path = dump_config(cfg, tmp_path / "sub" / "config.yaml")
    assert path.is_file()
    assert load_config(path, []) == cfg


def test_defaults_when_no_file():
    cfg = load_config(None, [])
    assert cfg == PrismConfig()
    assert cfg.stages == {} and cfg.enabled_stages() == []


@pytest.mark.parametrize(
    "override,path,expected",
    [
        ("optim.lr=1e-6", ("optim", "lr"), 1e-6),  # exponent without a dot: a float, not a string
        ("optim.lr=2.5E-4", ("optim", "lr"), 2.5e-4),
        ("optim.lr=0", ("optim", "lr"), 0.0),  # int accepted for a float
        ("parallel.tp=2", ("parallel", "tp"), 2),
        ("parallel.vpp=4", ("parallel", "vpp"), 4),
        ("parallel.vpp=null", ("parallel", "vpp"), None),
        ("parallel.vpp=", ("parallel", "vpp"), None),
        ("parallel.sequence_parallel=true", ("parallel", "sequence_parallel"), True),
        ("data.lenient=false", ("data", "lenient"), False),
        ("rollout.top_k=-1", ("rollout", "top_k"), -1),
        ("rollout.engine=sglang", ("rollout", "engine"), "sglang"),
        ("model.hf_dir=/models/Qwen3-VL-4B", ("model", "hf_dir"), "/models/Qwen3-VL-4B"),
        ("model.dtype=bfloat16", ("model", "dtype"), "bfloat16"),
        ("algorithm.clip_high=0.28", ("algorithm", "clip_high"), 0.28),
        ("algorithm.loss_agg=seq-mean-token-sum", ("algorithm", "loss_agg"), "seq-mean-token-sum"),
        ("run.logger=none", ("run", "logger"), "none"),
        ("run.output_dir=a=b", ("run", "output_dir"), "a=b"),  # only the first '=' splits
    ],
)
def test_override_each_type(override, path, expected):
    cfg = load_config(TINY, [override])
    value = getattr(getattr(cfg, path[0]), path[1])
    assert value == expected and type(value) is type(expected)


def test_override_yaml_list_value():
    assert parse_override("x.y=[1, 2]") == ("x.y", [1, 2])
    assert parse_override("x.y={a: 1}") == ("x.y", {"a": 1})


def test_later_override_wins():
    assert load_config(TINY, ["parallel.tp=2", "parallel.tp=4"]).parallel.tp == 4


def test_nested_stage_overrides():
    cfg = load_config(TINY, ["stages.sft.steps=10", "stages.warmup.enabled=false", "stages.eval.output_dir=x/e"])
    assert cfg.stages["sft"].steps == 10
    assert cfg.stages["eval"].output_dir == "x/e"
    assert [s.name for s in cfg.enabled_stages()] == ["sft", "align", "rlvr", "eval"]


def test_stage_added_by_override_needs_its_required_keys(tmp_path):
    path = _write(tmp_path, "stages:\n  sft: {steps: 1, global_batch_size: 1, save_every: 1, eval_every: 1, output_dir: o}\n")
    with pytest.raises(ConfigError, match=r"missing required key 'stages.rlvr.global_batch_size' in override 'stages.rlvr.steps=3'"):
        load_config(path, ["stages.rlvr.steps=3"])
    cfg = load_config(path, ["stages.rlvr={steps: 3, global_batch_size: 2, save_every: 3, eval_every: 1, output_dir: r}"])
    assert list(cfg.stages) == ["sft", "rlvr"]


def test_unknown_key_in_file_names_key_file_and_nearest(tmp_path):
    path = _write(tmp_path, "optim:\n  lrr: 1.0e-5\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, [])
    assert str(err.value) == f"unknown key 'optim.lrr' in {path}; did you mean 'optim.lr'?"


def test_unknown_stage_name_in_file(tmp_path):
    path = _write(tmp_path, "stages:\n  rlfv: {}\n")
    with pytest.raises(ConfigError, match=r"unknown key 'stages.rlfv' in .*cfg.yaml; did you mean 'stages.rlvr'\?"):
        load_config(path, [])


def test_unknown_key_in_override_names_override_file_and_nearest():
    with pytest.raises(ConfigError) as err:
        load_config(TINY, ["optim.lrr=1e-6"])
    msg = str(err.value)
    assert "unknown key 'optim.lrr'" in msg
    assert "override 'optim.lrr=1e-6'" in msg
    assert str(TINY) in msg
    assert msg.endswith("did you mean 'optim.lr'?")


@pytest.mark.parametrize(
    "override,nearest",
    [
        ("lr=1e-6", "optim.lr"),  # right leaf, wrong section
        ("stages.sft.step=5", "stages.sft.steps"),
        ("stages.sfft.steps=5", "stages.sft"),
        ("paralel.tp=2", "parallel"),
    ],
)
def test_nearest_key_suggestions(override, nearest):
    with pytest.raises(ConfigError, match=rf"did you mean '{nearest}'\?$"):
        load_config(TINY, [override])


def test_unknown_key_without_a_near_match_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown key 'zzz' .*valid keys at the top level: model, parallel, "):
        load_config(TINY, ["zzz=1"])


@pytest.mark.parametrize(
    "override,expected,got",
    [
        ("parallel.tp=two", "int", "str 'two'"),
        ("parallel.tp=true", "int", "bool True"),  # bools are not ints
        ("parallel.tp=2.0", "int", "float 2.0"),
        ("optim.lr=true", "float", "bool True"),  # nor floats
        ("optim.lr=fast", "float", "str 'fast'"),
        ("parallel.vpp=x", "int or null", "str 'x'"),
        ("data.lenient=1", "bool", "int 1"),
        ("rollout.engine=3", "string", "int 3"),
        ("stages.sft.steps=[1, 2]", "int", "list [1, 2]"),
        ("optim=3", "a mapping", "int 3"),
    ],
)
def test_wrong_types(override, expected, got):
    key = override.split("=")[0]
    with pytest.raises(ConfigError) as err:
        load_config(TINY, [override])
    assert str(err.value) == f"key '{key}' in override '{override}' (config {TINY}) expects {expected}, got {got}"


def test_wrong_type_in_file_names_file(tmp_path):
    path = _write(tmp_path, "parallel:\n  pp: '2'\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, [])
    assert str(err.value) == f"key 'parallel.pp' in {path} expects int, got str '2'"


@pytest.mark.parametrize(
    "override,choices",
    [
        ("model.dtype=fp8", "'auto', 'float32', 'bfloat16', 'float16'"),
        ("model.attention_backend=xformers", "'auto', 'sdpa', 'te', 'flash', 'fused', 'unfused'"),
        ("model.recompute=partial", "'none', 'selective', 'full'"),
        ("optim.schedule=linear", "'constant', 'cosine'"),
        ("run.logger=mlflow", "'tensorboard', 'wandb', 'none'"),
    ],
)
def test_literal_violation(override, choices):
    key, value = override.split("=")
    with pytest.raises(ConfigError, match=rf"key '{key}' .* expects one of {choices}, got str '{value}'$"):
        load_config(TINY, [override])


def test_stage_name_must_match_its_key():
    with pytest.raises(ConfigError, match=r"'stages.sft.name' .* is 'rlvr', but this entry is written under 'stages.sft'"):
        load_config(TINY, ["stages.sft.name=rlvr"])
    assert load_config(TINY, ["stages.sft.name=sft"]).stages["sft"].name == "sft"


@pytest.mark.parametrize("bad", ["optim.lr", "optim.lr 1e-6", "=3", "optim..lr=1", ".lr=1"])
def test_malformed_override(bad):
    with pytest.raises(ConfigError, match=r"^override '.*' (is not of the form key=value|has an empty key)"):
        load_config(TINY, [bad])


def test_override_below_a_value_is_rejected():
    with pytest.raises(ConfigError, match=r"'optim.lr' is a value, not a section"):
        load_config(TINY, ["optim.lr.x=1"])


def test_invalid_yaml_value_in_override():
    with pytest.raises(ConfigError, match=r"^override 'optim.lr=\[1': invalid YAML"):
        load_config(TINY, ["optim.lr=[1"])


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: .*nope.yaml"):
        load_config(tmp_path / "nope.yaml", [])
    with pytest.raises(ConfigError, match=r"a config file must be a mapping"):
        load_config(_write(tmp_path, "- 1\n- 2\n"), [])
    with pytest.raises(ConfigError, match=r"found duplicate key 'tp'"):
        load_config(_write(tmp_path, "parallel:\n  tp: 1\n  tp: 2\n"), [])
    with pytest.raises(ConfigError, match=r"invalid YAML"):
        load_config(_write(tmp_path, "optim: [\n"), [])


def test_empty_file_and_null_sections_mean_defaults(tmp_path):
    assert load_config(_write(tmp_path, ""), []) == PrismConfig()
    assert load_config(_write(tmp_path, "optim:\nstages:\n"), []) == PrismConfig()


def test_every_schema_field_is_in_the_tiny_example():
    """tiny.yaml is documented as the complete reference; keep it so when fields are added."""
    import yaml

    from megatron_prism.config.schema import STAGE_SECTIONS

    written = yaml.safe_load(TINY.read_text())
    full = config_to_dict(load_config(TINY, []))
    for section, values in full.items():
        if section == "stages":
            for name, stage in values.items():
                # (a section a stage does not read is left out: writing it there is refused)
                unread = {sec for sec, readers in STAGE_SECTIONS.items() if name not in readers}
                assert set(stage) - {"name"} - unread == set(written["stages"][name]), name
        else:
            assert set(values) == set(written[section]), section
    assert {f.name for f in dataclasses.fields(PrismConfig)} == set(written)
