"""Reading and writing YAML for configs, with two fixes over plain ``yaml.safe_load``.

* Floats written in exponent form without a dot (``1e-6``, ``3E5``) are floats. PyYAML follows
  YAML 1.1, which reads them as *strings*; learning rates are written exactly this way, so the
  plain loader would turn ``optim.lr=1e-6`` into a confusing type error.
* A key repeated in one mapping is an error instead of silently keeping the last value.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from megatron_prism.config.errors import ConfigError


class _ConfigLoader(yaml.SafeLoader):
    """``SafeLoader`` plus exponent-only floats and duplicate-key detection."""

    def construct_mapping(self, node, deep=False):  # noqa: D102 - same contract as the base
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {key!r}", key_node.start_mark,
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


# Added after PyYAML's own resolvers, so ints and YAML 1.1 floats still resolve as before; this
# one only catches what they leave as strings: a mantissa with an exponent and no sign after e.
_ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text (a whole file or one override value); errors name ``source``."""
    try:
        return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: invalid YAML: {exc}") from None


def read_yaml_file(path: str | Path) -> dict:
    """Read a config file into a plain dict; an empty file is an empty config."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    data = parse_yaml(text, str(path))
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping of sections, got {type(data).__name__}")
    return data


def write_yaml_file(data: dict, path: str | Path) -> Path:
    """Write ``data`` as block-style YAML, keeping key order, creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False, default_flow_style=False), encoding="utf-8")
    return path
