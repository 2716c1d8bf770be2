"""@tool: schemas from signatures and docstrings, validation for the model, ToolContext,
sync and async tools in a run, bad definitions, and approvals (durable waits)."""

from __future__ import annotations

import threading
from typing import Any, Literal

import pytest

from garrison import RunStatus
from garrison.agents import Agent, Message, ScriptedModel, Tool, ToolContext, tool
from garrison.errors import ConfigurationError
from garrison.resilience import Retry
from garrison.testing import FakeClock

from ._agents_support import agent_app, call
from ._support import ParkWatch

# -- schema -------------------------------------------------------------------------


@tool
def refund(order_id: str, amount_cents: int, reason: str = "customer request") -> str:
    """Refund part of an order.

    Longer text the model does not need.

    Args:
        order_id: the order to refund.
        amount_cents (int): how much, in cents;
            never more than the order total.
        reason: why.
    """
    return f"refunded {amount_cents} on {order_id}"


def test_schema_comes_from_signature_and_docstring_args() -> None:
    assert refund.name == "refund"
    assert refund.description == "Refund part of an order."
    params = refund.parameters
    assert params["type"] == "object"
    assert params["required"] == ["order_id", "amount_cents"]
    props = params["properties"]
    assert props["order_id"]["type"] == "string"
    assert props["order_id"]["description"] == "the order to refund."
    assert props["amount_cents"]["type"] == "integer"
    assert props["amount_cents"]["description"] == (
        "how much, in cents; never more than the order total.")
    assert props["reason"]["default"] == "customer request"
    assert "title" not in params


def test_spec_is_name_description_and_parameters() -> None:
    assert refund.spec() == {"name": "refund", "description": "Refund part of an order.",
                             "parameters": refund.parameters}


def test_name_and_description_can_be_given_explicitly() -> None:
    @tool(name="find-order", description="Find an order by id.")
    def lookup(order_id: str) -> str:
        """Ignored."""
        return order_id

    assert lookup.name == "find-order"
    assert lookup.description == "Find an order by id."


def test_tool_without_docstring_is_described_by_its_name() -> None:
    @tool
    def ping() -> str:
        return "pong"

    assert ping.description == "ping"
    assert ping.parameters.get("properties", {}) == {}


def test_tool_context_parameter_is_hidden_from_schema() -> None:
    @tool
    def charge(ctx: ToolContext, amount_cents: int) -> str:
        """Charge the card."""
        return ctx.idempotency_key

    assert list(charge.parameters["properties"]) == ["amount_cents"]
    assert charge.parameters["required"] == ["amount_cents"]


def test_literal_and_list_types_reach_the_schema() -> None:
    @tool
    def route(priority: Literal["low", "high"], tags: list[str]) -> str:
        """Route a ticket."""
        return priority

    props = route.parameters["properties"]
    assert props["priority"]["enum"] == ["low", "high"]
    assert props["tags"]["type"] == "array"
    assert props["tags"]["items"] == {"type": "string"}


def test_side_effect_tool_is_not_idempotent_by_default() -> None:
    @tool(side_effects=True)
    def send_email(to: str) -> str:
        """Send an email."""
        return to

    assert send_email.side_effects is True
    assert send_email.idempotent is False
    assert refund.idempotent is True


async def test_tool_can_be_called_directly_unjournaled() -> None:
    @tool
    async def double(x: int) -> int:
        """Double x."""
        return 2 * x

    assert await double(x=4) == 8
    assert await refund("o1", 5) == "refunded 5 on o1"


# -- validation, phrased for the model -------------------------------------------------


def test_validate_returns_json_values_with_defaults() -> None:
    assert refund.validate('{"order_id": "o1", "amount_cents": 250}') == {
        "order_id": "o1", "amount_cents": 250, "reason": "customer request"}


def test_validate_coerces_numeric_strings_like_pydantic() -> None:
    assert refund.validate('{"order_id": "o1", "amount_cents": "250"}')["amount_cents"] == 250


def test_invalid_argument_type_names_the_field_for_the_model() -> None:
    with pytest.raises(ValueError, match=r"^invalid arguments for refund: amount_cents: "):
        refund.validate('{"order_id": "o1", "amount_cents": "lots"}')


def test_missing_argument_is_named() -> None:
    with pytest.raises(ValueError, match=r"order_id: Field required"):
        refund.validate('{"amount_cents": 1}')


def test_invalid_json_message_shows_the_schema_to_send() -> None:
    with pytest.raises(ValueError) as caught:
        refund.validate('{"order_id": ')
    text = str(caught.value)
    assert text.startswith("arguments are not valid JSON (")
    assert '"amount_cents"' in text  # the schema is in the message


def test_arguments_that_are_not_an_object_are_refused() -> None:
    with pytest.raises(ValueError, match="must be a JSON object, got list"):
        refund.validate("[1, 2]")


def test_empty_arguments_mean_no_arguments() -> None:
    @tool
    def ping() -> str:
        """Ping."""
        return "pong"

    assert ping.validate("") == {}
    assert ping.validate("  ") == {}


# -- bad definitions: ConfigurationError naming the fix ---------------------------------


def test_var_positional_parameters_are_refused() -> None:
    def spread(*items: str) -> str:
        return ""

    with pytest.raises(ConfigurationError, match="give every parameter a name and a type"):
        tool(spread)


def test_var_keyword_parameters_are_refused() -> None:
    def options(**kw: str) -> str:
        return ""

    with pytest.raises(ConfigurationError, match=r"\*kw cannot be described"):
        tool(options)


def test_invalid_tool_name_says_to_pass_name() -> None:
    def ok(x: int) -> int:
        return x

    with pytest.raises(ConfigurationError, match=r"pass @tool\(name=\.\.\.\)"):
        tool(name="has space")(ok)


def test_unresolvable_annotation_says_to_import_at_module_level() -> None:
    def lookup(order: NotDefinedAnywhere) -> str:  # type: ignore[name-defined]  # noqa: F821
        return ""

    with pytest.raises(ConfigurationError, match="import the types it names at module level"):
        tool(lookup)


def test_non_callable_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="decorates a function"):
        Tool(42)  # type: ignore[arg-type]  # the point of the test


def test_agent_refuses_an_undecorated_function() -> None:
    def plain(x: int) -> int:
        return x

    with pytest.raises(ConfigurationError, match="decorate the function with @tool"):
        Agent("a", model=ScriptedModel(), tools=[plain])  # type: ignore[list-item]


def test_agent_refuses_two_tools_with_one_name() -> None:
    other = tool(name="refund")(lambda order_id: order_id)
    with pytest.raises(ConfigurationError, match="two tools are named 'refund'"):
        Agent("a", model=ScriptedModel(), tools=[refund, other])


def test_tool_named_like_a_handoff_clashes() -> None:
    billing = Agent("billing", model=ScriptedModel())
    fake = tool(name="transfer_to_billing")(lambda: "x")
    with pytest.raises(ConfigurationError, match="clashes with a handoff"):
        Agent("triage", model=ScriptedModel(), tools=[fake], handoffs=[billing])


# -- tools in a run ---------------------------------------------------------------------


async def test_sync_and_async_tools_both_answer_the_model(db_url: str) -> None:
    threads: list[str] = []

    @tool
    def add(a: int, b: int) -> int:
        """Add."""
        threads.append(threading.current_thread().name)
        return a + b

    @tool
    async def shout(text: str) -> dict[str, str]:
        """Upper-case."""
        return {"text": text.upper()}

    model = ScriptedModel([[call("add", {"a": 2, "b": 3}), call("shout", {"text": "hi"})],
                           "done"])
    agent = Agent("calc", model=model, tools=[add, shout])
    async with agent_app(db_url, agent) as app:
        result = await agent.run(app, "go", run_id="r")
    assert result.output == "done"
    tool_msgs = [m for m in model.calls[1].messages if m.role == "tool"]
    assert [(m.name, m.content) for m in tool_msgs] == [("add", "5"),
                                                        ("shout", '{"text": "HI"}')]
    assert threads and threads[0] != threading.main_thread().name  # sync tools run off-loop


async def test_tool_context_carries_the_step_idempotency_key(db_url: str) -> None:
    seen: list[ToolContext] = []

    @tool(retry=Retry(max_attempts=2, base=0))
    def charge(ctx: ToolContext, amount_cents: int) -> str:
        """Charge."""
        seen.append(ctx)
        if len(seen) == 1:
            raise ConnectionError("card network hiccup")
        return "charged"

    model = ScriptedModel([call("charge", {"amount_cents": 100}, call_id="c1"), "ok"])
    agent = Agent("pay", model=model, tools=[charge])
    async with agent_app(db_url, agent) as app:
        await agent.run(app, "charge it", run_id="pay-1")
        journal = await app.store.load_journal("pay-1")
    step = next(s for s in journal if s.name == "tool.charge")
    assert [c.attempt for c in seen] == [1, 2]
    assert {c.idempotency_key for c in seen} == {f"pay-1:{step.position}"}
    assert {(c.run_id, c.tool_call_id) for c in seen} == {("pay-1", "c1")}


async def test_tool_arguments_are_validated_values_not_raw_json(db_url: str) -> None:
    got: list[Any] = []

    @tool
    def count(n: int, label: str = "x") -> str:
        """Count."""
        got.append((n, label))
        return "ok"

    model = ScriptedModel([call("count", {"n": "7"}), "done"])
    agent = Agent("counter", model=model, tools=[count])
    async with agent_app(db_url, agent) as app:
        await agent.run(app, "count", run_id="r")
    assert got == [(7, "x")]


# -- approvals ------------------------------------------------------------------------


def approval_agent(model: ScriptedModel, ran: list[int],
                   timeout_s: float | None = None) -> Agent:
    @tool(requires_approval=True, side_effects=True)
    def refund_order(amount_cents: int) -> str:
        """Refund."""
        ran.append(amount_cents)
        return f"refunded {amount_cents}"

    return Agent("support", model=model, tools=[refund_order],
                 approval_timeout_s=timeout_s)


def approval_model() -> ScriptedModel:
    return ScriptedModel([call("refund_order", {"amount_cents": 500}, call_id="c1"),
                          "finished"])


async def test_approved_tool_runs_after_the_run_parks(db_url: str) -> None:
    ran: list[int] = []
    model = approval_model()
    agent = approval_agent(model, ran)
    watch = ParkWatch()
    async with agent_app(db_url, agent, hooks=[watch]) as app:
        handle = await agent.start(app, "refund me", run_id="ap")
        await watch.parked("ap")
        assert await handle.status() is RunStatus.WAITING
        assert ran == []
        await app.send("ap", "approval", True)
        result = await agent.result(handle)
    assert ran == [500]
    assert result.output == "finished"
    assert model.calls[1].messages[-1] == Message(
        "tool", "refunded 500", tool_call_id="c1", name="refund_order", agent="support")


@pytest.mark.parametrize(("decision", "reason"), [
    (False, ""), ({"approved": False, "reason": "over the limit"}, "over the limit")])
async def test_rejected_tool_does_not_run_and_model_sees_why(
        db_url: str, decision: Any, reason: str) -> None:
    ran: list[int] = []
    model = approval_model()
    agent = approval_agent(model, ran)
    watch = ParkWatch()
    async with agent_app(db_url, agent, hooks=[watch]) as app:
        handle = await agent.start(app, "refund me", run_id="rej")
        await watch.parked("rej")
        await app.send("rej", "approval", decision)
        result = await agent.result(handle)
    assert ran == []
    assert result.output == "finished"
    last = model.calls[1].messages[-1]
    assert (last.role, last.tool_call_id, last.is_error) == ("tool", "c1", True)
    assert last.content is not None
    assert last.content.startswith("The call was not approved")
    assert reason in last.content
    assert last.content.endswith("Do not retry it; tell the user.")
    assert result.usage.tool_calls == 0


async def test_approval_with_approved_mapping_runs_the_tool(db_url: str) -> None:
    ran: list[int] = []
    agent = approval_agent(approval_model(), ran)
    watch = ParkWatch()
    async with agent_app(db_url, agent, hooks=[watch]) as app:
        handle = await agent.start(app, "refund me", run_id="ok")
        await watch.parked("ok")
        await app.send("ok", "approval", {"approved": True})
        await agent.result(handle)
    assert ran == [500]


async def test_approval_timeout_counts_as_rejected(db_url: str, clock: FakeClock) -> None:
    ran: list[int] = []
    model = approval_model()
    agent = approval_agent(model, ran, timeout_s=60)
    watch = ParkWatch()
    async with agent_app(db_url, agent, clock=clock, hooks=[watch]) as app:
        handle = await agent.start(app, "refund me", run_id="late")
        await watch.parked("late")
        clock.advance(59)
        assert await handle.status() is RunStatus.WAITING
        clock.advance(1)
        result = await agent.result(handle)
    assert ran == []
    assert result.output == "finished"
    last = model.calls[1].messages[-1]
    assert last.is_error
    assert last.content is not None
    assert last.content.startswith(
        "The call was not approved: no decision before the approval timeout")


async def test_approval_survives_a_restart_without_calling_the_model_again(
        db_url: str) -> None:
    ran: list[int] = []
    model = approval_model()
    agent = approval_agent(model, ran)
    watch = ParkWatch()
    async with agent_app(db_url, agent, hooks=[watch]) as app:
        await agent.start(app, "refund me", run_id="restart")
        await watch.parked("restart")
    assert len(model.calls) == 1
    async with agent_app(db_url, agent) as app2:
        await app2.send("restart", "approval", True)
        result = await agent.result(app2.handle("restart"))
    assert ran == [500]
    assert result.output == "finished"
    assert len(model.calls) == 2


async def test_tool_step_is_not_repeated_when_the_run_is_read_again(db_url: str) -> None:
    ran: list[int] = []
    agent = approval_agent(approval_model(), ran)
    watch = ParkWatch()
    async with agent_app(db_url, agent, hooks=[watch]) as app:
        handle = await agent.start(app, "refund me", run_id="once")
        await watch.parked("once")
        await app.send("once", "approval", True)
        first = await agent.result(handle)
        again = await agent.run(app, "refund me", run_id="once")
    assert ran == [500]
    assert again == first
