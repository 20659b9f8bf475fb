"""Multi-seed experiments over named arms (``prism experiment``): arms, the runner, the report and
its statistics. See :mod:`.runner` for the command, :mod:`.stats` for the tests."""

from megatron_prism.experiments.arms import ALGORITHMS, ARMS, Arm, parse_arms, register_arm
from megatron_prism.experiments.report import build_report, render_markdown
from megatron_prism.experiments.runner import ExperimentError, ExperimentSpec, run_experiment
from megatron_prism.experiments.stats import compare, mean_std, paired_bootstrap_ci, paired_t_test

__all__ = ["ALGORITHMS", "ARMS", "Arm", "ExperimentError", "ExperimentSpec", "build_report", "compare", "mean_std",
           "paired_bootstrap_ci", "paired_t_test", "parse_arms", "register_arm", "render_markdown", "run_experiment"]
