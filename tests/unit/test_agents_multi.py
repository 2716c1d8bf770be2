"""Several agents: handoffs switch the speaking agent; `as_tool` runs a child run whose
usage counts in the parent's and whose own budget applies."""

from __future__ import annotations

import json

import pydantic
import pytest

from garrison.agents import (
    Agent,
    Budget,
    HandoffEvent,
    Message,
    Price,
    PriceTable,
    ScriptedModel,
    tool,
)
from garrison.errors import ConfigurationError, WorkflowCancelled
from garrison.testing import FakeClock

from ._agents_support import agent_app, call, response
from ._support import ParkWatch


@tool
def lookup_invoice(invoice_id: str) -> str:
    """Find an invoice."""
    return f"invoice {invoice_id}: paid"


def billing_and_triage(billing_model: ScriptedModel, triage_model: ScriptedModel
                       ) -> tuple[Agent, Agent]:
    billing = Agent("billing", model=billing_model, instructions="You are billing.",
                    tools=[lookup_invoice], description="invoices and refunds")
    triage = Agent("triage", model=triage_model, instructions="You route requests.",
                   handoffs=[billing])
    return billing, triage


async def test_handoff_switches_the_agent_and_its_system_prompt(db_url: str) -> None:
    triage_model = ScriptedModel([call("transfer_to_billing", call_id="h1")], name="t")
    billing_model = ScriptedModel([call("lookup_invoice", {"invoice_id": "9"}),
                                   "Invoice 9 is paid."], name="b")
    _billing, triage = billing_and_triage(billing_model, triage_model)
    async with agent_app(db_url, triage) as app:
        result = await triage.run(app, "is invoice 9 paid?")
    assert result.agent == "billing"
    assert result.output == "Invoice 9 is paid."
    assert len(triage_model.calls) == 1
    assert len(billing_model.calls) == 2
    assert triage_model.calls[0].messages[0] == Message.system("You route requests.")
    assert triage_model.calls[0].tools == ("transfer_to_billing",)
    for later in billing_model.calls:
        assert later.messages[0] == Message.system("You are billing.")
        assert later.tools == ("lookup_invoice",)
    # the conversation so far goes along, with the handoff's own tool result
    handed = billing_model.calls[0].messages
    assert handed[1] == Message.user("is invoice 9 paid?")
    assert handed[-1] == Message("tool", "Transferred to billing.", tool_call_id="h1",
                                 name="transfer_to_billing", agent="triage")
    assert result.models_used == ["test:t", "test:b"]


def test_handoff_tool_is_offered_with_the_description() -> None:
    billing, triage = billing_and_triage(ScriptedModel(), ScriptedModel())
    assert triage.tool_specs() == [{
        "name": "transfer_to_billing",
        "description": "Hand the conversation to the billing agent: invoices and refunds",
        "parameters": {"type": "object", "properties": {}}}]
    assert billing.handoffs == {}


async def test_calls_after_a_handoff_in_the_same_message_are_not_run(db_url: str) -> None:
    ran: list[str] = []

    @tool
    def note(text: str) -> str:
        """Note."""
        ran.append(text)
        return "ok"

    billing = Agent("billing", model=ScriptedModel(["billing here"], name="b"))
    triage = Agent("triage", model=ScriptedModel(
        [[call("transfer_to_billing", call_id="h"), call("note", {"text": "x"}, call_id="n")]],
        name="t"), tools=[note], handoffs=[billing])
    async with agent_app(db_url, triage) as app:
        result = await triage.run(app, "hi")
    assert ran == []
    skipped = [m for m in result.messages if m.tool_call_id == "n"]
    assert len(skipped) == 1
    assert skipped[0].is_error
    assert skipped[0].content == "Not run: the conversation was handed off."


async def test_handoff_is_streamed(db_url: str) -> None:
    _billing, triage = billing_and_triage(
        ScriptedModel(["paid"], name="b"),
        ScriptedModel([call("transfer_to_billing")], name="t"))
    async with agent_app(db_url, triage) as app:
        events = [e async for e in triage.stream(app, "invoice?", run_id="s")]
    handoffs = [e for e in events if isinstance(e, HandoffEvent)]
    assert [(h.from_agent, h.to_agent) for h in handoffs] == [("triage", "billing")]


class Verdict(pydantic.BaseModel):
    paid: bool


async def test_handoff_target_output_is_checked_against_its_own_type(db_url: str) -> None:
    billing = Agent("billing", model=ScriptedModel(['{"paid": true}'], name="b"),
                    output_type=Verdict)
    triage = Agent("triage", model=ScriptedModel([call("transfer_to_billing")], name="t"),
                   handoffs=[billing])
    async with agent_app(db_url, triage) as app:
        result = await triage.run(app, "paid?")
        as_billing = billing.result_from(
            {"output": {"paid": True}, "agent": "billing"}, result.run_id)
    assert result.agent == "billing"
    assert result.output == Verdict(paid=True)  # the answering agent's type
    assert as_billing.output == Verdict(paid=True)


def delegation(child_model: ScriptedModel, parent_model: ScriptedModel, *,
               child_budget: Budget | None = None) -> tuple[Agent, Agent]:
    prices = PriceTable({"priced": Price(1.0, 1.0)}, defaults=False)
    researcher = Agent("researcher", model=child_model, instructions="You research.",
                       tools=[lookup_invoice], prices=prices, description="finds facts")
    lead = Agent("lead", model=parent_model, prices=prices,
                 tools=[researcher.as_tool(budget=child_budget)])
    return researcher, lead


async def test_agent_as_tool_runs_a_child_run(db_url: str) -> None:
    child_model = ScriptedModel([response("x is 42", input_tokens=300, output_tokens=30)],
                                name="priced")
    parent_model = ScriptedModel([
        response(calls=[("d1", "researcher", {"input": "find x"})], input_tokens=100,
                 output_tokens=10),
        response("x = 42", input_tokens=200, output_tokens=20)], name="priced")
    _researcher, lead = delegation(child_model, parent_model)
    async with agent_app(db_url, lead) as app:
        result = await lead.run(app, "what is x?", run_id="lead-1")
        runs = await app.list_runs()
    assert result.output == "x = 42"
    assert parent_model.calls[1].messages[-1] == Message(
        "tool", "x is 42", tool_call_id="d1", name="researcher", agent="lead")
    assert child_model.calls[0].messages == (Message.system("You research."),
                                             Message.user("find x"))
    children = [r for r in runs if r.workflow_name == "agent:researcher"]
    assert len(children) == 1
    assert children[0].parent_run_id == "lead-1"
    # the child's model call counts in the parent's usage and cost
    assert result.usage.model_calls == 3
    assert result.usage.tool_calls == 1
    assert result.usage.input_tokens == 600
    assert result.usage.output_tokens == 60
    assert result.cost_usd == pytest.approx(660 / 1_000_000)


def test_agent_tool_spec_and_validation() -> None:
    researcher = Agent("researcher", model=ScriptedModel(), description="finds facts")
    as_tool = researcher.as_tool()
    assert as_tool.spec()["name"] == "researcher"
    assert as_tool.spec()["description"] == "finds facts"
    assert as_tool.spec()["parameters"]["required"] == ["input"]
    assert as_tool.validate('{"input": "q"}') == {"input": "q"}
    with pytest.raises(ValueError, match=r'researcher takes \{"input": "<text>"\}'):
        as_tool.validate('{"question": "q"}')
    with pytest.raises(ValueError, match="not valid JSON"):
        as_tool.validate("{")
    renamed = researcher.as_tool(name="ask_research", description="Ask.")
    assert (renamed.name, renamed.description) == ("ask_research", "Ask.")


async def test_child_budget_applies_and_its_failure_goes_back_to_the_parent(
        db_url: str) -> None:
    child_model = ScriptedModel([call("lookup_invoice", {"invoice_id": "1"}), "never said"],
                                name="priced")
    parent_model = ScriptedModel([call("researcher", {"input": "check invoice 1"},
                                       call_id="d1"), "I could not find out."],
                                 name="priced")
    _researcher, lead = delegation(child_model, parent_model,
                                  child_budget=Budget(model_calls=1))
    async with agent_app(db_url, lead) as app:
        result = await lead.run(app, "invoice 1?", run_id="lead-2")
        runs = await app.list_runs()
    assert len(child_model.calls) == 1  # the child's second call was over its budget
    assert result.output == "I could not find out."
    told = parent_model.calls[1].messages[-1]
    assert told.is_error
    assert told.content is not None
    assert told.content.startswith("Error: the researcher agent failed: ")
    assert "model_calls" in told.content
    child = next(r for r in runs if r.workflow_name == "agent:researcher")
    assert child.parent_run_id == "lead-2"
    assert child.error is not None
    assert json.loads(child.error)["type"].endswith("BudgetExceeded")


async def test_child_uses_its_own_budget_by_default(db_url: str) -> None:
    child_model = ScriptedModel(default=call("lookup_invoice", {"invoice_id": "1"}),
                                name="priced")
    researcher = Agent("researcher", model=child_model, tools=[lookup_invoice],
                       budget=Budget(model_calls=2))
    lead = Agent("lead", model=ScriptedModel([call("researcher", {"input": "q"}), "done"]),
                 tools=[researcher.as_tool()], budget=Budget(model_calls=50))
    async with agent_app(db_url, lead) as app:
        result = await lead.run(app, "q")
    assert len(child_model.calls) == 2
    assert result.output == "done"


def test_agent_configuration_errors_name_the_fix() -> None:
    model = ScriptedModel()
    with pytest.raises(ConfigurationError, match="letters, digits"):
        Agent("has space", model=model)
    with pytest.raises(ConfigurationError, match="max_turns"):
        Agent("a", model=model, max_turns=0)
    with pytest.raises(ConfigurationError, match="names a model twice"):
        Agent("a", model=model, fallback_models=[model])
    with pytest.raises(ConfigurationError, match="output_retries and max_tool_repairs"):
        Agent("a", model=model, output_retries=-1)
    with pytest.raises(ConfigurationError, match="unknown provider 'nope'"):
        Agent("a", model="nope:x")
    with pytest.raises(ConfigurationError, match="write 'provider:model'"):
        Agent("a", model="gpt-4o")


async def test_empty_prompt_is_refused(db_url: str) -> None:
    agent = Agent("a", model=ScriptedModel(["x"]))
    async with agent_app(db_url, agent) as app:
        with pytest.raises(ConfigurationError, match="non-empty str"):
            await agent.run(app, "   ")


async def test_agent_tool_deadline_is_durable_and_cancels_the_child(
        db_url: str, clock: FakeClock) -> None:
    @tool(requires_approval=True)
    def refund_order(amount_cents: int) -> str:
        """Refund."""
        return "refunded"

    child_model = ScriptedModel([call("refund_order", {"amount_cents": 5}), "never"],
                                name="c")
    child = Agent("child", model=child_model, tools=[refund_order])
    parent_model = ScriptedModel([call("child", {"input": "refund"}), "gave up"], name="p")
    parent = Agent("parent", model=parent_model, tools=[child.as_tool(timeout_s=30)])
    watch = ParkWatch()
    async with agent_app(db_url, parent, clock=clock, hooks=[watch]) as app:
        handle = await parent.start(app, "go", run_id="p")
        await watch.parked("p")
        clock.advance(30)
        result = await parent.result(handle)
        [child_run] = [r for r in await app.list_runs() if r.workflow_name == "agent:child"]
        with pytest.raises(WorkflowCancelled):
            await app.handle(child_run.run_id).result(timeout=5)
    assert result.output == "gave up"
    told = parent_model.calls[1].messages[-1]
    assert told.is_error
    assert told.content is not None
    assert told.content == ("Error: the child agent did not answer within 30 s; its run "
                            "was cancelled")
    assert child_run.parent_run_id == "p"
