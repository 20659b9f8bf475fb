"""``load_config``: a YAML file plus dotted ``key=value`` overrides, validated into a PrismConfig.

Overrides are applied to the raw dict *before* validation, so an overridden value goes through
exactly the same checks as one written in the file, and a run's resolved config (written by
``dump_config``) is the single record of what it ran with.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from megatron_prism.config.build import config_from_dict, config_to_dict
from megatron_prism.config.errors import ConfigError
from megatron_prism.config.schema import PrismConfig
from megatron_prism.config.yaml_io import parse_yaml, read_yaml_file, write_yaml_file


def parse_override(raw: str) -> tuple[str, Any]:
    """Split ``'optim.lr=1e-6'`` into ``('optim.lr', 1e-06)``.

    The value is read as a YAML scalar (or flow collection), so ``true``, ``null``, ``1e-6`` and
    ``[1, 2]`` mean what they mean in the file; an empty value is ``null``.
    """
    key, sep, text = raw.partition("=")
    key = key.strip()
    if not sep:
        raise ConfigError(f"override '{raw}' is not of the form key=value (for example optim.lr=1e-6)")
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{raw}' has an empty key or key part; write dotted keys like optim.lr=1e-6")
    return key, parse_yaml(text, f"override '{raw}'")


def apply_override(data: dict, key: str, value: Any, raw: str) -> None:
    """Set ``data[a][b][c] = value`` for ``key='a.b.c'``, creating missing sections."""
    node = data
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            parent = ".".join(parts[: depth + 1])
            raise ConfigError(f"override '{raw}' sets a key under '{parent}', but '{parent}' is a value, not a section")
        node = child
    node[parts[-1]] = value


def load_config(path: str | Path | None, overrides: Iterable[str] = ()) -> PrismConfig:
    """Read ``path`` (or start from defaults when ``None``), apply ``overrides``, validate.

    Raises :class:`ConfigError` with a message naming the dotted key, its source (file or
    override) and the nearest valid key or the expected type.
    """
    data = read_yaml_file(path) if path is not None else {}
    source = str(path) if path is not None else "<defaults>"
    origins: dict[str, str] = {}
    for raw in overrides:
        key, value = parse_override(raw)
        apply_override(data, key, value, raw)
        origins[key] = raw
    return config_from_dict(data, source=source, origins=origins)


def dump_config(cfg: PrismConfig, path: str | Path) -> Path:
    """Write the resolved config as YAML; ``load_config(path, [])`` reads back an equal config."""
    return write_yaml_file(config_to_dict(cfg), path)
