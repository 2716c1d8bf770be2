"""Budgets (tokens, cost, tool calls, model calls) and loop detection stop a run at the
right call, with the numbers on the error."""

from __future__ import annotations

import pytest

from garrison.agents import (
    Agent,
    Budget,
    LoopGuard,
    ModelSettings,
    Price,
    PriceTable,
    ScriptedModel,
    Tool,
    ToolCall,
    Usage,
    tool,
)
from garrison.agents._budget import call_signature
from garrison.errors import BudgetExceeded, ConfigurationError, LoopDetected

from ._agents_support import agent_app, call, response


def counting_tool(ran: list[str]) -> Tool:
    @tool
    def note(text: str) -> str:
        """Write a note."""
        ran.append(text)
        return "noted"

    return note


def note_calls(n: int, *, tokens: tuple[int, int] = (100, 10)) -> list[object]:
    """n model replies calling `note` with distinct arguments, then an answer."""
    replies: list[object] = [
        response(calls=[(f"c{i}", "note", {"text": f"t{i}"})], input_tokens=tokens[0],
                 output_tokens=tokens[1]) for i in range(n)]
    replies.append(response("done", input_tokens=tokens[0], output_tokens=tokens[1]))
    return replies


def make_agent(model: ScriptedModel, ran: list[str], **options: object) -> Agent:
    return Agent("worker", model=model, tools=[counting_tool(ran)],
                 **options)  # type: ignore[arg-type]


# -- budgets ---------------------------------------------------------------------------


async def test_token_budget_stops_before_the_call_that_would_start_spent(db_url: str) -> None:
    ran: list[str] = []
    model = ScriptedModel(note_calls(5), name="priced")
    agent = make_agent(model, ran, budget=Budget(tokens=200))
    async with agent_app(db_url, agent) as app:
        with pytest.raises(BudgetExceeded) as caught:
            await agent.run(app, "go", run_id="tok")
    err = caught.value
    assert (err.budget, err.limit, err.used) == ("tokens", 200, 220)
    assert err.run_id == "tok"
    assert err.agent == "worker"
    assert len(model.calls) == 2  # 110 tokens, then 220: the third call may not start
    assert ran == ["t0", "t1"]


async def test_max_tokens_is_capped_to_what_is_left(db_url: str) -> None:
    ran: list[str] = []
    model = ScriptedModel(note_calls(2), name="priced")
    agent = make_agent(model, ran, budget=Budget(tokens=300),
                       model_settings=ModelSettings(max_tokens=150, temperature=0.0))
    async with agent_app(db_url, agent) as app:
        await agent.run(app, "go")
    assert [c.settings.max_tokens for c in model.calls] == [150, 150, 80]
    assert {c.settings.temperature for c in model.calls} == {0.0}


async def test_max_tokens_is_set_from_the_budget_when_settings_give_none(db_url: str) -> None:
    ran: list[str] = []
    model = ScriptedModel(note_calls(1), name="priced")
    agent = make_agent(model, ran, budget=Budget(tokens=500))
    async with agent_app(db_url, agent) as app:
        await agent.run(app, "go")
    assert [c.settings.max_tokens for c in model.calls] == [500, 390]


async def test_cost_budget_stops_the_run(db_url: str) -> None:
    ran: list[str] = []
    # Each call: 100 in x $10/Mtok + 10 out x $100/Mtok = $0.002.
    prices = PriceTable({"priced": Price(10.0, 100.0)}, defaults=False)
    model = ScriptedModel(note_calls(5), name="priced")
    agent = make_agent(model, ran, prices=prices, budget=Budget(cost_usd=0.005))
    async with agent_app(db_url, agent) as app:
        with pytest.raises(BudgetExceeded) as caught:
            await agent.run(app, "go")
    err = caught.value
    assert err.budget == "cost_usd"
    assert err.limit == 0.005
    assert err.used == pytest.approx(0.006)
    assert len(model.calls) == 3


async def test_tool_call_budget_stops_before_the_tool_runs(db_url: str) -> None:
    ran: list[str] = []
    model = ScriptedModel(note_calls(5), name="priced")
    agent = make_agent(model, ran, budget=Budget(tool_calls=2))
    async with agent_app(db_url, agent) as app:
        with pytest.raises(BudgetExceeded) as caught:
            await agent.run(app, "go")
    assert (caught.value.budget, caught.value.limit, caught.value.used) == ("tool_calls", 2, 2)
    assert ran == ["t0", "t1"]
    assert len(model.calls) == 3  # the third asked for a tool it may not call


async def test_model_call_budget_stops_the_run(db_url: str) -> None:
    ran: list[str] = []
    model = ScriptedModel(note_calls(5), name="priced")
    agent = make_agent(model, ran, budget=Budget(model_calls=2))
    async with agent_app(db_url, agent) as app:
        with pytest.raises(BudgetExceeded) as caught:
            await agent.run(app, "go")
    assert (caught.value.budget, caught.value.limit, caught.value.used) == ("model_calls", 2, 2)
    assert len(model.calls) == 2
    assert ran == ["t0", "t1"]


async def test_run_budget_overrides_the_agent_budget(db_url: str) -> None:
    ran: list[str] = []
    model = ScriptedModel(note_calls(5), name="priced")
    agent = make_agent(model, ran, budget=Budget(model_calls=100))
    async with agent_app(db_url, agent) as app:
        with pytest.raises(BudgetExceeded) as caught:
            await agent.run(app, "go", budget=Budget(model_calls=1))
    assert caught.value.limit == 1
    assert len(model.calls) == 1


async def test_run_within_budget_finishes(db_url: str) -> None:
    ran: list[str] = []
    model = ScriptedModel(note_calls(2), name="priced")
    agent = make_agent(model, ran, budget=Budget(tokens=10_000, tool_calls=2, model_calls=3))
    async with agent_app(db_url, agent) as app:
        result = await agent.run(app, "go")
    assert result.output == "done"
    assert result.usage.tool_calls == 2


async def test_budget_message_names_the_fix(db_url: str) -> None:
    ran: list[str] = []
    agent = make_agent(ScriptedModel(note_calls(3), name="priced"), ran,
                       budget=Budget(model_calls=1))
    async with agent_app(db_url, agent) as app:
        with pytest.raises(BudgetExceeded, match=r"budget model_calls=1 spent \(1 used\); "
                           r"raise Agent\(budget=Budget\(\.\.\.\)\)"):
            await agent.run(app, "go")


@pytest.mark.parametrize("options", [{"tokens": -1}, {"cost_usd": -0.01},
                                     {"tool_calls": True}, {"model_calls": -5}])
def test_budget_refuses_negative_and_bool_limits(options: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError, match="a number >= 0 or None"):
        Budget(**options)  # type: ignore[arg-type]


def test_budget_round_trips_through_its_dict_form() -> None:
    budget = Budget(tokens=100, cost_usd=0.5, tool_calls=3, model_calls=4)
    assert budget.to_dict() == {"tokens": 100, "cost_usd": 0.5, "tool_calls": 3,
                                "model_calls": 4}
    assert Budget.from_dict(budget.to_dict()) == budget
    assert Budget().to_dict() == {}
    assert Budget.from_dict(None) is None
    assert Budget.from_dict({}) is None


def test_zero_budget_allows_no_call() -> None:
    with pytest.raises(BudgetExceeded):
        Budget(model_calls=0).check_model_call(Usage(), 0.0, run_id="r", agent="a")
    assert Budget(tokens=10).tokens_left(Usage(8, 5)) == 1  # never 0: a provider refuses 0


# -- loop detection --------------------------------------------------------------------


async def test_same_call_three_times_is_a_loop(db_url: str) -> None:
    ran: list[str] = []
    model = ScriptedModel(default=call("note", {"text": "same"}))
    agent = make_agent(model, ran)
    async with agent_app(db_url, agent) as app:
        with pytest.raises(LoopDetected) as caught:
            await agent.run(app, "go", run_id="loop")
    assert caught.value.calls == ['note({"text":"same"})']
    assert caught.value.run_id == "loop"
    assert ran == ["same", "same"]  # the third identical call did not run
    assert len(model.calls) == 3


async def test_cycle_of_two_calls_repeated_three_times_is_a_loop(db_url: str) -> None:
    ran: list[str] = []
    replies = [call("note", {"text": t}) for t in ["a", "b"] * 4]
    model = ScriptedModel(replies)
    agent = make_agent(model, ran, loop_guard=LoopGuard(max_repeats=10, cycle_repeats=3))
    async with agent_app(db_url, agent) as app:
        with pytest.raises(LoopDetected) as caught:
            await agent.run(app, "go")
    assert caught.value.calls == ['note({"text":"a"})', 'note({"text":"b"})']
    assert ran == ["a", "b", "a", "b", "a"]


async def test_distinct_calls_are_not_a_loop(db_url: str) -> None:
    ran: list[str] = []
    model = ScriptedModel([call("note", {"text": t}) for t in "abcdefg"] + ["done"])
    agent = make_agent(model, ran, max_turns=20)
    async with agent_app(db_url, agent) as app:
        result = await agent.run(app, "go")
    assert result.output == "done"
    assert ran == list("abcdefg")


def test_loop_guard_repeat_counts_anywhere_in_the_run() -> None:
    guard = LoopGuard()
    guard.check(["a", "b", "a", "c"], run_id="r", agent="x")
    with pytest.raises(LoopDetected):
        guard.check(["a", "b", "a", "c", "a"], run_id="r", agent="x")


def test_loop_guard_cycles() -> None:
    guard = LoopGuard(max_repeats=100, cycle_repeats=3)
    guard.check(["a", "b", "a", "b"], run_id="r", agent="x")  # twice: not yet
    guard.check(["a", "b", "c", "a", "b", "c", "a", "b"], run_id="r", agent="x")
    with pytest.raises(LoopDetected) as caught:
        guard.check(["z", "a", "b", "c", "a", "b", "c", "a", "b", "c"], run_id="r", agent="x")
    assert caught.value.calls == ["a", "b", "c"]
    guard.check([], run_id="r", agent="x")


def test_loop_guard_refuses_thresholds_below_two() -> None:
    with pytest.raises(ConfigurationError, match="both must be >= 2"):
        LoopGuard(max_repeats=1)
    with pytest.raises(ConfigurationError, match="both must be >= 2"):
        LoopGuard(cycle_repeats=1)


def test_call_signature_ignores_argument_order_and_spacing() -> None:
    assert call_signature(ToolCall("1", "f", '{"a": 1, "b": 2}')) == call_signature(
        ToolCall("2", "f", '{"b":2,"a":1}'))
    assert call_signature(ToolCall("1", "f", "")) == "f({})"
