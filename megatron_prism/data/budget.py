"""Do a split's demonstrations fit a stage's response budget?

WARMUP and ALIGN set the policy's responses (at most ``rollout.max_new_tokens`` tokens, the end
token included) against the split's demonstrations. A demonstration longer than that budget is one
the policy can never write: imitating it gets the response cut off, marked invalid and penalised,
so the game pushes the policy away from the teacher. That is a data/config mismatch, so it is an
error before any model is built, naming the records and by how much, never a silent skew.

The generator of the embedded task checks its own demonstrations with the same function, so what
it writes always fits the ALIGN budget it was asked for.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

#: How many offending records an error names (the count says how many there are in all).
SHOWN = 5


class ResponseBudgetError(ValueError):
    """Demonstrations longer than a stage's response budget; the message names them and the fix."""


@dataclass(frozen=True)
class Overlong:
    record: str  # the record's id (or file:line)
    tokens: int  # its demonstration's tokens, end token included


def overlong(demonstrations: Iterable[tuple[str, str]], count_tokens: Callable[[str], int],
             budget: int) -> tuple[list[Overlong], int]:
    """(the demonstrations of more than ``budget`` tokens, how many were counted) for
    ``(record id, response text with its end token)`` pairs."""
    over, counted = [], 0
    for record, text in demonstrations:
        counted += 1
        n = count_tokens(text)
        if n > budget:
            over.append(Overlong(record, n))
    return over, counted


def check_response_budget(demonstrations: Iterable[tuple[str, str]], count_tokens: Callable[[str], int],
                          budget: int, *, where: str, setting: str) -> None:
    """Raises :class:`ResponseBudgetError` when a demonstration does not fit ``budget`` tokens.

    ``where``: the split (path) the demonstrations come from; ``setting``: the config key (or
    generator field) that sets the budget, named in the fix."""
    over, counted = overlong(demonstrations, count_tokens, budget)
    if not over:
        return
    worst = max(o.tokens for o in over)
    shown = ", ".join(f"{o.record} ({o.tokens} tokens, {o.tokens - budget} over)"
                      for o in sorted(over, key=lambda o: -o.tokens)[:SHOWN])
    more = f" and {len(over) - SHOWN} more" if len(over) > SHOWN else ""
    raise ResponseBudgetError(
        f"{where}: {len(over)} of {counted} demonstrations do not fit {setting}={budget} (end token included): "
        f"{shown}{more}; raise {setting} to at least {worst}, or shorten or drop those records")
