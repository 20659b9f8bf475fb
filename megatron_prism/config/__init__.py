"""Typed configuration for a PRISM run: dataclasses per concern, YAML files, dotted overrides.

    cfg = load_config("examples/configs/tiny.yaml", ["optim.lr=1e-6", "stages.sft.steps=10"])
    dump_config(cfg, "outputs/tiny/config.yaml")
"""

from megatron_prism.config.build import config_from_dict, config_to_dict, describe_type
from megatron_prism.config.errors import ConfigError
from megatron_prism.config.loader import apply_override, dump_config, load_config, parse_override
from megatron_prism.config.schema import (
    STAGE_ORDER,
    AlgorithmConfig,
    AlignConfig,
    DataConfig,
    DiscriminatorConfig,
    ModelConfig,
    OptimizerConfig,
    ParallelConfig,
    PrismConfig,
    RolloutConfig,
    RunConfig,
    StageConfig,
)

__all__ = [
    "STAGE_ORDER",
    "AlgorithmConfig",
    "AlignConfig",
    "ConfigError",
    "DataConfig",
    "DiscriminatorConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "PrismConfig",
    "RolloutConfig",
    "RunConfig",
    "StageConfig",
    "apply_override",
    "config_from_dict",
    "config_to_dict",
    "describe_type",
    "dump_config",
    "load_config",
    "parse_override",
]
