"""``prism plan``: the layout and memory planner, one concern in one package.

``shapes``  model shapes from a Qwen3-VL ``config.json`` or a named preset (exact parameter counts);
``memory``  per-GPU memory and throughput estimates for a layout, and the search over layouts;
``report``  what ``prism plan`` prints and its exit status, from a resolved config.

Torch-free except for the config rules' registered names (the same check `prism run` makes first), so it
runs on a login node in a couple of seconds.
"""

from megatron_prism.plan.memory import (
    GiB,
    HEADROOM_GIB,
    Assumptions,
    Estimate,
    Layout,
    Workload,
    choose,
    estimate,
    stage_params,
    steps_per_hour,
)
from megatron_prism.plan.report import run_plan
from megatron_prism.plan.shapes import PRESETS, ModelShape, PlanError, shape_from_hf_config

__all__ = [
    "GiB", "HEADROOM_GIB", "PRESETS", "Assumptions", "Estimate", "Layout", "ModelShape", "PlanError", "Workload",
    "choose", "estimate", "run_plan", "shape_from_hf_config", "stage_params", "steps_per_hour",
]
