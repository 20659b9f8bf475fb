"""Validate first: the rules a loaded config must satisfy, each failing with one line that names
the key, where it was set and the fix (megatron_prism.config.validate)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from megatron_prism.config import ConfigError, load_config
from megatron_prism.config.validate import (
    check_config,
    find_problems,
    largest_useful_dp,
    launcher_world_size,
    stage_batch_problem,
    synth_sizes,
)

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "examples" / "configs" / "tiny.yaml"


def _problems(overrides: list[str], *, world_size: int | None = 1, config: Path = TINY, **kw) -> list[str]:
    cfg = load_config(config, overrides)
    return find_problems(cfg, source=str(config), overrides=overrides, world_size=world_size, **kw)


def test_the_shipped_configs_break_no_rule():
    assert _problems([]) == []
    for size in ("8b", "4b"):  # their planned layout: one node of 8 GPUs; paths are placeholders here
        assert _problems([], config=ROOT / "examples" / "configs" / f"prism_{size}.yaml", world_size=8,
                         paths=False) == []


# (override, key named, words of the fix): each case a user can write on the command line
CASES = [
    ("algorithm.loss=ppoo", "algorithm.loss", "did you mean 'ppo'?"),
    ("algorithm.advantage=gpro", "algorithm.advantage", "did you mean 'grpo'?"),
    ("algorithm.reward=math_fromat", "algorithm.reward", "did you mean 'math_format'?"),
    ("algorithm.kl_kind=k4", "algorithm.kl_kind", "unknown KL estimator 'k4'"),
    ("algorithm.reward_shaping=dapo", "algorithm.reward_shaping", "did you mean 'dapo_overlong'?"),
    ("algorithm.sampling_filter=dynamic", "algorithm.sampling_filter", "unknown sampling filter"),
    ("rollout.engine=vllmm", "rollout.engine", "did you mean 'vllm'?"),
    ("parallel.tp=0", "parallel.tp", "must be at least 1"),
    ("parallel.pp=-1", "parallel.pp", "must be at least 1"),
    ("parallel.micro_batch_size=0", "parallel.micro_batch_size", "must be at least 1"),
    ("parallel.vpp=7", "parallel.vpp", "needs pipeline parallelism"),
    ("parallel.tp=3", "parallel.tp", "does not divide the policy's 4 attention heads"),
    ("parallel.pp=3", "parallel.pp", "does not divide the policy's 4 layers"),
    ("parallel.sequence_parallel=true", "parallel.sequence_parallel", "needs parallel.tp > 1"),
    ("parallel.ep=3", "parallel.ep", "must divide discriminator.num_experts=4"),
    ("stages.sft.steps=-3", "stages.sft.steps", "must be at least 1"),
    ("stages.rlvr.steps=0", "stages.rlvr.steps", "must be at least 1"),
    ("stages.align.global_batch_size=0", "stages.align.global_batch_size", "must be at least 1"),
    ("stages.sft.save_every=0", "stages.sft.save_every", "must be at least 1"),
    ("stages.sft.eval_every=-1", "stages.sft.eval_every", "must be at least 0"),
    ("data.synth_sizes=sft=abc", "data.synth_sizes", "the count 'abc' is not a whole number"),
    ("data.synth_sizes=sft=10,align=5", "data.synth_sizes", "no size for split(s) rl, eval"),
    ("data.max_pixels=100", "data.max_pixels", "at least data.min_pixels=16384"),
    ("data.max_seq_len=0", "data.max_seq_len", "must be at least 1"),
    ("rollout.max_new_tokens=256", "rollout.max_new_tokens", "leaves no room for the prompt"),
    ("rollout.top_p=1.5", "rollout.top_p", "must lie in (0, 1]"),
    ("rollout.top_k=0", "rollout.top_k", "-1 (off) or at least 1"),
    ("rollout.gpu_memory_fraction=1.0", "rollout.gpu_memory_fraction", "must lie in (0, 1)"),
    ("rollout.gpu_memory_fraction=0", "rollout.gpu_memory_fraction", "must lie in (0, 1)"),
    ("rollout.tp=0", "rollout.tp", "must be at least 1"),
    ("rollout.wait_timeout_s=0", "rollout.wait_timeout_s", "must be at least 1"),
    ("rollout.n=1", "rollout.n", "use at least 2"),
    ("optim.lr=-1e-3", "optim.lr", "must be at least 0"),
    ("optim.adam_beta2=1.0", "optim.adam_beta2", "must lie in [0, 1)"),
    ("optim.min_lr=1.0", "optim.min_lr", "is above optim.lr"),
    ("algorithm.clip_low=1.5", "algorithm.clip_low", "must lie in (0, 1)"),
    ("algorithm.dual_clip=0.5", "algorithm.dual_clip", "must be above 1"),
    ("algorithm.ppo_epochs=0", "algorithm.ppo_epochs", "must be at least 1"),
    ("algorithm.reward_shaping=dapo_overlong", "algorithm.overlong_buffer", "needs a buffer in (0,"),
    ("discriminator.topk=5", "discriminator.topk", "[1, discriminator.num_experts=4]"),
    ("discriminator.head_dropout=1.0", "discriminator.head_dropout", "must lie in [0, 1)"),
    ("discriminator.micro_batch_pairs=0", "discriminator.micro_batch_pairs", "must be at least 1"),
    ("align.samples_per_prompt=1", "align.samples_per_prompt", "must be at least 2"),
    ("model.hf_dir=/nothere", "model.hf_dir", "has no config.json"),
    ("model.megatron_dir=/tmp", "model.megatron_dir", "not a megatron_prism checkpoint"),
    ("discriminator.hf_dir=/nothere", "discriminator.hf_dir", "has no config.json"),
    ("data.root=/nothere", "data.root", "is not a directory"),
    ("stages.rlvr.data_path=/nothere/rl.jsonl", "stages.rlvr.data_path", "does not exist"),
    # per-stage sections: only under a stage that reads them, only its keys, by the run-wide rules
    ("stages.sft.algorithm.loss=gspo", "stages.sft.algorithm", "stage sft does not read the algorithm section"),
    ("stages.warmup.optim.warmup_steps=1", "stages.warmup.optim", "stage warmup does not read the optim section"),
    ("stages.align.optim.lr=1e-3", "stages.align.optim.lr", "the stage's learning rate is stages.align.lr"),
    ("stages.align.algorithm.reward=exact", "stages.align.algorithm.reward", "set it run-wide as algorithm.reward"),
    ("stages.align.rollout.n=4", "stages.align.rollout.n", "set it run-wide as rollout.n"),
    ("stages.rlvr.algorithm.loss=gspoo", "stages.rlvr.algorithm.loss", "did you mean 'gspo'?"),
    ("stages.rlvr.algorithm.clip_low=1.5", "stages.rlvr.algorithm.clip_low", "must lie in (0, 1)"),
    ("stages.align.rollout.max_new_tokens=256", "stages.align.rollout.max_new_tokens", "leaves no room for the prompt"),
    ("stages.align.optim.warmup_steps=10", "stages.align.optim.warmup_steps",
     "is not shorter than stage align's 10 optimizer step(s)"),
]


@pytest.mark.parametrize("override,key,fix", CASES, ids=[c[0] for c in CASES])
def test_each_rule_names_its_key_the_override_and_the_fix(override, key, fix):
    cfg = load_config(TINY, [override])
    with pytest.raises(ConfigError) as err:
        check_config(cfg, source=str(TINY), overrides=[override], world_size=1)
    line = str(err.value)
    assert "\n" not in line
    # where the key was set: the override, or the file when the rule joins two keys and names the override's
    assert line.startswith((f"key '{key}' in override '{override}' (config {TINY})", f"key '{key}' in {TINY}")), line
    assert override in line
    assert fix in line, line


def test_a_warm_up_a_stage_inherits_is_named_where_it_was_set_with_the_stage_key_as_the_fix():
    (line,) = _problems(["stages.rlvr.steps=5"])
    assert line.startswith(f"key 'optim.warmup_steps' in {TINY} is 10: is not shorter than stage rlvr's 5 "), line
    assert "set stages.rlvr.optim.warmup_steps below 5" in line
    # counted in optimizer updates: 5 steps x 2 PPO epochs x 1 mini-batch = 10 updates, so 5 fits
    assert _problems(["stages.rlvr.steps=5", "stages.rlvr.optim.warmup_steps=5", "stages.rlvr.algorithm.ppo_epochs=2"]) == []


def test_a_rule_broken_in_the_file_names_the_file(tmp_path):
    text = TINY.read_text().replace("  tp: 1\n", "  tp: 0\n", 1)
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=rf"^key 'parallel.tp' in {path} is 0: the tensor-parallel size"):
        check_config(load_config(path, []), source=str(path))


def test_several_problems_show_the_first_and_count_the_rest():
    overrides = ["parallel.tp=0", "stages.sft.steps=-3", "rollout.top_p=2"]
    with pytest.raises(ConfigError, match=r"^key 'parallel.tp' .* \(and 2 more problems\)$"):
        check_config(load_config(TINY, overrides), source=str(TINY), overrides=overrides)


def test_an_unknown_engine_is_one_problem_not_two():
    assert len(_problems(["rollout.engine=vllmm"])) == 1


def test_a_gpu_engine_needs_no_hf_weights_on_disk():
    """Engines start from the checkpoint's config with dummy weights (the Slurm recipe passes
    model.hf_dir=null), so a GPU engine with no model.hf_dir breaks no rule."""
    assert _problems(["rollout.engine=sglang"]) == []
    assert _problems(["rollout.engine=vllm", "model.hf_dir=null"]) == []


def test_rollout_tp_must_divide_the_ranks_and_hold_whole_model_parallel_groups():
    (line,) = _problems(["rollout.tp=3"], world_size=4)
    assert "rollout.tp" in line and "does not divide the 4 ranks" in line
    (line,) = _problems(["rollout.tp=2", "parallel.pp=2"], world_size=4)
    assert "rollout.tp" in line and "multiple of parallel.tp" in line
    assert _problems(["rollout.tp=2", "parallel.tp=2"], world_size=4) == []


def test_a_disabled_stage_is_not_checked_for_steps_or_data():
    assert _problems(["stages.rlvr.enabled=false", "stages.rlvr.steps=0", "rollout.n=1"]) == []


def test_world_size_rules():
    # TP x PP must divide the ranks
    (line,) = _problems(["parallel.tp=2"], world_size=3)
    assert "TP 2 x PP 1 = 2 does not divide the 3 ranks" in line
    # EP is carved out of data parallelism
    assert any("must divide the data-parallel size 1" in p for p in _problems(["parallel.ep=2", "parallel.tp=2"], world_size=2,
                                                                                paths=False))
    # a batch that a data-parallel layout cannot split into whole micro-batches
    lines = _problems(["stages.sft.global_batch_size=6"], world_size=4)
    assert lines == [f"key 'stages.sft.global_batch_size' in override 'stages.sft.global_batch_size=6' (config {TINY}) "
                     "is 6: does not split over 4 data-parallel ranks (the largest data-parallel size this batch can "
                     "use is 6); use fewer ranks or a global batch that is a multiple of 4"]
    # batches=False leaves the batch rule to the caller
    assert _problems(["stages.sft.global_batch_size=6"], world_size=4, batches=False) == []
    # unknown world size: those rules are skipped
    assert _problems(["parallel.tp=2"], world_size=None) == []


def test_batch_rule_and_largest_useful_dp_by_hand():
    cfg = load_config(ROOT / "examples" / "configs" / "prism_8b.yaml", [])
    st = cfg.stages
    # micro-batch 2; SFT 16 records (packed: one row per micro-batch, so one record per rank is
    # enough), WARMUP 128 pairs, ALIGN 4 prompts x 16 samples, RLVR 32 prompts x 16 samples
    assert {n: largest_useful_dp(cfg, st[n]) for n in ("sft", "warmup", "align", "rlvr")} == \
        {"sft": 16, "warmup": 64, "align": 4, "rlvr": 32}
    assert stage_batch_problem(cfg, st["sft"], 16) is None
    assert "does not split over 32 data-parallel ranks" in stage_batch_problem(cfg, st["sft"], 32)
    assert "1 pairs per step, not whole micro-batches of parallel.micro_batch_size=2" in \
        stage_batch_problem(cfg, st["warmup"], 128)
    assert "does not split over 256 data-parallel ranks" in stage_batch_problem(cfg, st["rlvr"], 256)
    odd = load_config(TINY, ["parallel.micro_batch_size=3", "stages.warmup.global_batch_size=4"])
    assert largest_useful_dp(odd, odd.stages["warmup"]) == 0
    assert "no data-parallel size can use it" in stage_batch_problem(odd, odd.stages["warmup"], 1)
    mini = load_config(TINY, ["algorithm.mini_batches=3"])  # RLVR: 16 x 8 sequences, micro-batch 1 -> 128
    assert "algorithm.mini_batches=3 does not divide" in stage_batch_problem(mini, mini.stages["rlvr"], 1)


def test_data_root_needs_the_split_of_each_enabled_stage(tmp_path):
    root = tmp_path / "data"
    (root / "tokenizer").mkdir(parents=True)  # the built-in tiny model is built for the synthetic tokenizer
    (root / "tokenizer" / "tokenizer.json").write_text("{}")
    for split in ("sft", "rl"):
        (root / split).mkdir(parents=True)
        (root / split / "part.jsonl").write_text("{}\n")
    (root / "eval").mkdir()  # present but empty
    base = [f"data.root={root}", "stages.warmup.enabled=false", "stages.align.enabled=false"]
    (line,) = _problems(base)
    assert "split folder" in line and str(root / "eval") in line and "is an empty folder" in line
    assert "`prism import`" in line
    (root / "eval" / "items.json").write_text("[]")  # a JSON list file counts as a record file
    assert _problems(base) == []
    (line,) = _problems([f"data.root={root}", "stages.align.enabled=false"])
    assert str(root / "align") in line and "(read by warmup)" in line and "does not exist" in line


def test_relative_paths_resolve_from_the_working_directory(tmp_path, monkeypatch):
    (tmp_path / "mine" / "sft").mkdir(parents=True)
    (tmp_path / "mine" / "sft" / "a.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    assert _problems(["stages.sft.data_path=mine/sft", "data.root=null"]) == []
    (line,) = _problems(["stages.sft.data_path=mine/nope"])
    assert "mine/nope" in line


def test_synth_sizes_parser():
    assert synth_sizes("sft=3, align=2,rl=1,eval=1") == {"sft": 3, "align": 2, "rl": 1, "eval": 1}
    for bad, words in (("sft=3,sft=4,align=1,rl=1,eval=1", "given twice"), ("sft:3", "not SPLIT=COUNT"),
                       ("sft=0,align=1,rl=1,eval=1", "at least 1"), ("val=3", "not SPLIT=COUNT")):
        with pytest.raises(ValueError, match=words):
            synth_sizes(bad)


@pytest.mark.parametrize("launcher,world", [("", 1), ("torchrun --nproc-per-node 8", 8),
                                            ("torchrun --nnodes=2 --nproc_per_node=4", 8),
                                            ("srun python", None)])
def test_launcher_world_size(launcher, world):
    assert launcher_world_size(launcher) == world


def test_strict_data_is_read_before_anything_runs(tmp_path):
    """data.lenient=false: the first malformed record of any split a stage will read is the error,
    named by file and line, before any model exists."""
    from megatron_prism.data.records import RecordError

    root = tmp_path / "data"
    (root / "tokenizer").mkdir(parents=True)
    (root / "tokenizer" / "tokenizer.json").write_text("{}")
    for split, row in (("sft", {"prompt": "q", "response": "a"}), ("eval", {"prompt": "q", "answer": "1"}),
                       ("rl", {"prompt": "q", "answer": "1"})):
        (root / split).mkdir()
        (root / split / "part.jsonl").write_text(json.dumps(row) + "\n")
    with open(root / "rl" / "part.jsonl", "a") as fh:
        fh.write('{"prompt": "q", "answer": \n')
    base = [f"data.root={root}", "stages.warmup.enabled=false", "stages.align.enabled=false"]
    cfg = load_config(TINY, base)
    check_config(cfg)  # lenient: the bad line will be a counted skip
    with pytest.raises(RecordError, match=rf"^{root / 'rl' / 'part.jsonl'}:2: malformed JSON"):
        check_config(load_config(TINY, [*base, "data.lenient=false"]))


def test_the_tiny_model_needs_the_synthetic_tokenizer(tmp_path):
    (tmp_path / "sft").mkdir()
    (tmp_path / "sft" / "a.jsonl").write_text("{}\n")
    lines = _problems([f"data.root={tmp_path}", "stages.warmup.enabled=false", "stages.align.enabled=false",
                       "stages.rlvr.enabled=false", "stages.eval.enabled=false", "stages.sft.eval_every=0"])
    assert len(lines) == 1 and "has no tokenizer/ folder" in lines[0] and "set model.hf_dir" in lines[0]


def test_float16_is_refused_in_one_line_naming_the_key():
    from megatron_prism.config.schema import PrismConfig
    from megatron_prism.config.validate import find_problems

    cfg = PrismConfig()
    cfg.model.dtype = "float16"
    problems = [p for p in find_problems(cfg, paths=False) if "model.dtype" in p]
    assert len(problems) == 1 and "\n" not in problems[0]
    assert "loss scaler" in problems[0] and "model.dtype=bfloat16" in problems[0]
    cfg.model.dtype = "auto"
    assert not [p for p in find_problems(cfg, paths=False) if "model.dtype" in p]
