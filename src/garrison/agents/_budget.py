"""Budgets and loop safety: what stops a run before it spends too much or spins.

Both are pure functions of the journaled history (usage and cost come from model
steps' journaled outputs), so a replay stops at exactly the same point.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from garrison.agents._messages import ToolCall, Usage
from garrison.errors import BudgetExceeded, ConfigurationError, LoopDetected

__all__ = ["Budget", "LoopGuard"]


@dataclass(frozen=True, slots=True)
class Budget:
    """Limits per run (None: no limit), checked before each model call and each tool call.

    A run stops with `BudgetExceeded` at the first call that would start with a limit
    reached; the call before it may have gone past the limit by its own usage (a model
    call's size is known only after it). With a token limit, each model call's
    `max_tokens` is capped to what is left.

    Args:
        tokens: input + output tokens.
        cost_usd: US dollars, from the agent's price table.
        tool_calls: tool calls made.
        model_calls: model calls made (see also `Agent(max_turns=)`).
    """

    tokens: int | None = None
    cost_usd: float | None = None
    tool_calls: int | None = None
    model_calls: int | None = None

    def __post_init__(self) -> None:
        for name in ("tokens", "cost_usd", "tool_calls", "model_calls"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or value < 0):
                raise ConfigurationError(f"Budget({name}={value!r}): a number >= 0 or None")

    def check_model_call(self, usage: Usage, cost_usd: float, *, run_id: str,
                         agent: str) -> None:
        """Raise `BudgetExceeded` if a model call may not start."""
        self._check("tokens", self.tokens, usage.total_tokens, run_id, agent)
        self._check("cost_usd", self.cost_usd, cost_usd, run_id, agent)
        self._check("model_calls", self.model_calls, usage.model_calls, run_id, agent)

    def check_tool_call(self, usage: Usage, *, run_id: str, agent: str) -> None:
        """Raise `BudgetExceeded` if one more tool call may not start."""
        self._check("tool_calls", self.tool_calls, usage.tool_calls, run_id, agent)

    def tokens_left(self, usage: Usage) -> int | None:
        return None if self.tokens is None else max(1, self.tokens - usage.total_tokens)

    @staticmethod
    def _check(name: str, limit: float | None, used: float, run_id: str, agent: str) -> None:
        if limit is not None and used >= limit:
            shown = f"{used:.4f}" if isinstance(used, float) else str(used)
            raise BudgetExceeded(
                f"run {run_id} (agent {agent!r}): budget {name}={limit} spent ({shown} used); "
                "raise Agent(budget=Budget(...)) or split the task",
                run_id=run_id, agent=agent, budget=name, limit=limit, used=used)

    def to_dict(self) -> dict[str, float]:
        return {k: v for k in ("tokens", "cost_usd", "tool_calls", "model_calls")
                if (v := getattr(self, k)) is not None}

    @classmethod
    def from_dict(cls, data: dict[str, float] | None) -> Budget | None:
        if not data:
            return None
        return cls(tokens=_int(data.get("tokens")), cost_usd=data.get("cost_usd"),
                   tool_calls=_int(data.get("tool_calls")),
                   model_calls=_int(data.get("model_calls")))


def _int(value: float | None) -> int | None:
    return None if value is None else int(value)


def call_signature(call: ToolCall) -> str:
    """A tool call as "name(canonical args)": equal for equal calls."""
    try:
        canonical = json.dumps(json.loads(call.arguments or "{}"), sort_keys=True,
                               separators=(",", ":"))
    except json.JSONDecodeError:
        canonical = call.arguments
    return f"{call.name}({canonical})"


class LoopGuard:
    """Detects an agent going round in circles.

    Args:
        max_repeats: the same tool with the same arguments this many times in a run
            (anywhere in it) is a loop.
        cycle_repeats: a sequence of 2 or more calls repeated back to back this many
            times (A B A B A B) is a loop.
    """

    def __init__(self, max_repeats: int = 3, cycle_repeats: int = 3) -> None:
        if max_repeats < 2 or cycle_repeats < 2:
            raise ConfigurationError(
                f"loop detection: max_repeats={max_repeats}, cycle_repeats={cycle_repeats}; "
                "both must be >= 2")
        self.max_repeats = max_repeats
        self.cycle_repeats = cycle_repeats

    def check(self, history: Sequence[str], *, run_id: str, agent: str) -> None:
        """Raise `LoopDetected` if `history` (call signatures, oldest first) loops."""
        if not history:
            return
        last = history[-1]
        if Counter(history)[last] >= self.max_repeats:
            raise LoopDetected(
                f"run {run_id} (agent {agent!r}): {last} was called {self.max_repeats} times "
                "with the same arguments; stopped as a loop. Check the tool's result tells "
                "the model what it needs, or raise max_repeats",
                run_id=run_id, agent=agent, calls=[last])
        n = len(history)
        for period in range(2, n // self.cycle_repeats + 1):
            block = history[n - period:]
            if len(set(block)) < 2:
                continue
            if all(history[n - (k + 1) * period: n - k * period] == block
                   for k in range(self.cycle_repeats)):
                raise LoopDetected(
                    f"run {run_id} (agent {agent!r}): the calls {' -> '.join(block)} repeated "
                    f"{self.cycle_repeats} times in a row; stopped as a loop",
                    run_id=run_id, agent=agent, calls=list(block))
