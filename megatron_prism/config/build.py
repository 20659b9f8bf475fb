"""Turning a plain (YAML-shaped) dict into a typed :class:`PrismConfig`, and back.

Validation is driven entirely by the dataclass annotations in :mod:`.schema`, so adding a field
there is all it takes for it to be read, checked, overridable and dumped. The rules are strict on
purpose, because a silently ignored or mis-typed key in a training config costs a whole run:

* an unknown key is an error that suggests the nearest valid key;
* ``bool`` is never accepted where a number is expected (YAML's ``yes``/``true`` are bools);
* an ``int`` is accepted for a ``float`` field and converted (``lr: 0`` is a fine float);
* a ``Literal`` field accepts exactly its listed strings.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Union

from megatron_prism.config.errors import ConfigError
from megatron_prism.config.schema import Partial, PrismConfig

_MISSING = object()


def describe_type(tp: Any) -> str:
    """A short human name for an annotation, as used in error messages."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(describe_type(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if dataclasses.is_dataclass(tp) or origin in (dict, Partial):
        return "a mapping"
    if origin is list:
        return f"a list of {describe_type(typing.get_args(tp)[0])}"
    return {bool: "bool", int: "int", float: "float", str: "string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _show(value: Any) -> str:
    if value is None:
        return "null"
    return f"{type(value).__name__} {value!r}"


def _leaf_keys(tp: Any, prefix: str) -> list[str]:
    """Every dotted key a config of type ``tp`` can hold (used for "did you mean")."""
    if typing.get_origin(tp) is Partial:
        return _leaf_keys(typing.get_args(tp)[0], prefix)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        out = []
        for f in dataclasses.fields(tp):
            key = f"{prefix}{f.name}"
            out.append(key)
            out.extend(_leaf_keys(hints[f.name], key + "."))
        return out
    if typing.get_origin(tp) is dict:
        key_tp, value_tp = typing.get_args(tp)
        if typing.get_origin(key_tp) is Literal:
            out = []
            for name in typing.get_args(key_tp):
                out.append(f"{prefix}{name}")
                out.extend(_leaf_keys(value_tp, f"{prefix}{name}."))
            return out
    return []


class _Builder:
    """One validation pass over a dict; knows where each key came from for error messages.

    ``origins`` maps a dotted key to the command-line override that set it; any other key is
    reported as coming from ``source`` (the config file).
    """

    def __init__(self, source: str, origins: dict[str, str]):
        self.source = source
        self.origins = origins
        self.all_keys = _leaf_keys(PrismConfig, "")

    def where(self, key: str) -> str:
        """Where ``key`` was set: the override that set it, one of its sections, or a key below
        it (``stages.sfft.steps=1`` is where the unknown ``stages.sfft`` came from); else the file."""
        parts = key.split(".")
        raw = next((self.origins[p] for p in (".".join(parts[:n]) for n in range(len(parts), 0, -1))
                    if p in self.origins), None)
        if raw is None:
            raw = next((r for k, r in self.origins.items() if k.startswith(key + ".")), None)
        if raw is not None:
            return f"in override '{raw}' (config {self.source})"
        return f"in {self.source}"

    def unknown(self, key: str, valid: list[str], prefix: str) -> ConfigError:
        leaf = key.rsplit(".", 1)[-1]
        close = difflib.get_close_matches(leaf, valid, n=1, cutoff=0.6)
        guess = prefix + close[0] if close else None
        if guess is None:
            same_leaf = [k for k in self.all_keys if k.rsplit(".", 1)[-1] == leaf]
            guess = same_leaf[0] if same_leaf else None
        if guess is None:
            close = difflib.get_close_matches(key, self.all_keys, n=1, cutoff=0.6)
            guess = close[0] if close else None
        msg = f"unknown key '{key}' {self.where(key)}"
        if guess is not None:
            return ConfigError(f"{msg}; did you mean '{guess}'?")
        section = f"under '{prefix[:-1]}'" if prefix else "at the top level"
        return ConfigError(f"{msg}; valid keys {section}: {', '.join(valid)}")

    def wrong(self, key: str, tp: Any, value: Any) -> ConfigError:
        return ConfigError(f"key '{key}' {self.where(key)} expects {describe_type(tp)}, got {_show(value)}")

    def convert(self, value: Any, tp: Any, key: str) -> Any:
        origin = typing.get_origin(tp)
        if dataclasses.is_dataclass(tp):
            return self.section(value, tp, key)
        if origin is dict:
            return self.mapping(value, tp, key)
        if origin is Partial:
            return self.partial(value, typing.get_args(tp)[0], key)
        if origin in (Union, types.UnionType):
            if value is None and type(None) in typing.get_args(tp):
                return None
            for arm in typing.get_args(tp):
                if arm is type(None):
                    continue
                if isinstance(value, dict) and typing.get_origin(arm) is Partial:
                    return self.convert(value, arm, key)  # its own error names the bad key inside
                try:
                    return self.convert(value, arm, key)
                except ConfigError:
                    pass
            raise self.wrong(key, tp, value)
        if origin is Literal:
            if isinstance(value, str) and value in typing.get_args(tp):
                return value
            raise self.wrong(key, tp, value)
        if origin is list:
            if not isinstance(value, list):
                raise self.wrong(key, tp, value)
            (item_tp,) = typing.get_args(tp)
            return [self.convert(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        if tp is bool:
            ok = isinstance(value, bool)
        elif tp is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif tp is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            value = float(value) if ok else value
        elif tp is str:
            ok = isinstance(value, str)
        else:  # a schema annotation this builder does not know: a bug in schema.py, not in the file
            raise TypeError(f"unsupported config annotation {tp!r} for '{key}'")
        if not ok:
            raise self.wrong(key, tp, value)
        return value

    def section(self, value: Any, cls: type, key: str, extra: dict | None = None) -> Any:
        """Build dataclass ``cls``; ``null`` stands for an empty section (all defaults)."""
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self.wrong(key, cls, value)
        prefix = f"{key}." if key else ""
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        for k in value:
            if k not in names:
                raise self.unknown(f"{prefix}{k}", names, prefix)
        kwargs = dict(extra or {})
        for f in dataclasses.fields(cls):
            raw = value.get(f.name, _MISSING)
            if raw is _MISSING:
                if f.name in kwargs:
                    continue
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ConfigError(f"missing required key '{prefix}{f.name}' {self.where(key)}")
                continue
            if f.name in kwargs and raw != kwargs[f.name]:
                raise ConfigError(
                    f"key '{prefix}{f.name}' {self.where(prefix + f.name)} is {raw!r}, but this entry is "
                    f"written under '{key}'; drop the key or make the two agree"
                )
            kwargs[f.name] = self.convert(raw, hints[f.name], prefix + f.name)
        return cls(**kwargs)

    def partial(self, value: Any, cls: type, key: str) -> dict:
        """Some keys of dataclass ``cls``, each checked against its field; kept as a dict."""
        if not isinstance(value, dict):
            raise self.wrong(key, dict[str, Any], value)
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        out = {}
        for k, v in value.items():
            if k not in names:
                raise self.unknown(f"{key}.{k}", names, f"{key}.")
            out[k] = self.convert(v, hints[k], f"{key}.{k}")
        return out

    def mapping(self, value: Any, tp: Any, key: str) -> dict:
        """A dict section. With ``Literal`` keys the result follows the Literal's order, and a
        dataclass value with a ``name`` field takes its name from its key."""
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise self.wrong(key, tp, value)
        key_tp, value_tp = typing.get_args(tp)
        names = typing.get_args(key_tp) if typing.get_origin(key_tp) is Literal else None
        for k in value:
            if names is not None and k not in names:
                raise self.unknown(f"{key}.{k}", list(names), f"{key}.")
            if names is None and not isinstance(k, str):
                raise ConfigError(f"key '{key}.{k}' {self.where(key)} must be a string")
        named = dataclasses.is_dataclass(value_tp) and "name" in {f.name for f in dataclasses.fields(value_tp)}
        out = {}
        for k in names if names is not None else list(value):
            if k not in value:
                continue
            sub = f"{key}.{k}"
            if named:
                out[k] = self.section(value[k], value_tp, sub, extra={"name": k})
            else:
                out[k] = self.convert(value[k], value_tp, sub)
        return out


def config_from_dict(data: dict, source: str = "<dict>", origins: dict[str, str] | None = None) -> PrismConfig:
    """Validate a YAML-shaped dict into a :class:`PrismConfig`.

    ``source`` names where ``data`` came from (a file path) and ``origins`` maps dotted keys to the
    override strings that set them; both only shape error messages.
    """
    return _Builder(source, origins or {}).section(data, PrismConfig, "")


def config_to_dict(cfg: PrismConfig) -> dict:
    """The config as plain dicts/lists/scalars, ready for YAML; ``config_from_dict`` inverts it."""
    return dataclasses.asdict(cfg)
