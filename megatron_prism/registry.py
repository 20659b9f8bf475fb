"""Name -> implementation registries, as verl registers its advantage estimators and losses.

Every variant a config can pick (advantage estimators, policy losses, KL estimators, reward
shapers, sampling filters, rewards) is registered under a name with a decorator, so that adding a
variant is one decorated function and the trainers never grow an ``if name == ...`` ladder. An
unknown name is an error that lists what is registered and suggests the nearest name.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """A config asked for a name nobody registered."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class Registry(Generic[T]):
    """A named table of implementations of one kind (``kind`` is used in error messages)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: ``@registry.register("grpo")``. Registering a name twice is an error."""

        def decorate(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is already registered ({self._entries[name]!r})")
            self._entries[name] = obj
            return obj

        return decorate

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._entries), n=1, cutoff=0.5)
            if not close and isinstance(name, str) and name:  # an abbreviation: "dapo" for "dapo_overlong"
                close = [n for n in sorted(self._entries) if n.startswith(name) or name in n][:1]
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}{hint} (registered: {', '.join(sorted(self._entries))})"
            ) from None

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))
