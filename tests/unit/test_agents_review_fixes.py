"""Bugs a review of garrison.agents found, each fixed: a rejection reads as a sentence,
a model that failed is not paid again every turn, a streamed repair or fallback takes
its partial text back."""

from __future__ import annotations

import pydantic

from garrison.agents import Agent, AgentEvent, ScriptedModel, StreamReset, TextDelta, tool

from ._agents_support import StreamingScript, agent_app, call, unavailable
from ._support import ParkWatch


@tool(requires_approval=True)
def refund_order(amount_cents: int) -> str:
    """Refund."""
    return "refunded"


def shown_text(events: list[AgentEvent]) -> str:
    """What a client displays, following StreamReset's contract."""
    text = ""
    for event in events:
        if isinstance(event, StreamReset):
            text = ""
        elif isinstance(event, TextDelta):
            text += event.text
    return text


async def test_rejection_with_reason_reads_as_a_sentence(db_url: str) -> None:
    # _loop._run_tool_calls: "... approved" + f": {reason}" + " Do not retry it" has no
    # period after the reason (also for the approval timeout's reason).
    model = ScriptedModel([call("refund_order", {"amount_cents": 5}), "ok"])
    agent = Agent("support", model=model, tools=[refund_order])
    watch = ParkWatch()
    async with agent_app(db_url, agent, hooks=[watch]) as app:
        handle = await agent.start(app, "refund", run_id="r")
        await watch.parked("r")
        await app.send("r", "approval", {"approved": False, "reason": "over the limit"})
        await agent.result(handle)
    assert model.calls[1].messages[-1].content == (
        "The call was not approved: over the limit. Do not retry it; tell the user.")


async def test_model_that_failed_permanently_is_not_called_again_every_turn(
        db_url: str) -> None:
    # _call_models starts every turn from model_floor, which only output fallbacks move:
    # a primary that failed with a non-retryable error is called (and retried) again on
    # every later turn, and result.fallbacks lists it once per turn.
    @tool
    def ping() -> str:
        """Ping."""
        return "pong"

    primary = ScriptedModel(default=unavailable("p", retryable=False), name="p")
    backup = ScriptedModel([call("ping", call_id="a"), call("ping", {}, call_id="b"),
                            "done"], name="backup")
    agent = Agent("fb", model=primary, fallback_models=[backup], tools=[ping],
                  loop_guard=None, max_turns=20)
    async with agent_app(db_url, agent) as app:
        result = await agent.run(app, "hi")
    assert result.output == "done"
    assert len(primary.calls) == 1
    assert result.fallbacks == ["test:p"]


class Order(pydantic.BaseModel):
    id: int


async def test_streamed_output_repair_does_not_show_both_answers(db_url: str) -> None:
    # The repair turn is a new model step (new key prefix): its text is appended to the
    # rejected answer's, with no StreamReset (nor any boundary event) between them.
    model = ScriptedModel(["not json", '{"id": 3}'])
    agent = Agent("orders", model=model, output_type=Order)
    async with agent_app(db_url, agent) as app:
        events = [e async for e in agent.stream(app, "order?", run_id="s")]
    assert shown_text(events) == '{"id": 3}'


async def test_streamed_fallback_drops_the_failed_models_partial_text(db_url: str) -> None:
    # The fallback model's call is another step position, so _DeltaWriter never sees the
    # failed model's partial text: no StreamReset, the client shows "HelGoodbye".
    primary = StreamingScript([(["Hel"], unavailable("streamer", retryable=False))])
    backup = ScriptedModel(["Goodbye"], name="backup")
    agent = Agent("fb", model=primary, fallback_models=[backup])
    async with agent_app(db_url, agent) as app:
        events = [e async for e in agent.stream(app, "hi", run_id="s")]
    assert shown_text(events) == "Goodbye"
