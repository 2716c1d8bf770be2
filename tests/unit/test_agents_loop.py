"""The agent loop: tool calls and answers, repairs, structured output, fallbacks,
idempotent and resumed runs, history, settings, usage and cost."""

from __future__ import annotations

import asyncio
from typing import Any

import pydantic
import pytest

from garrison import RunStatus
from garrison.agents import (
    Agent,
    Message,
    ModelSettings,
    Price,
    PriceTable,
    ScriptedModel,
    Usage,
    tool,
)
from garrison.errors import (
    MaxTurnsExceeded,
    OutputValidationError,
    ProviderAuthError,
    ProviderUnavailable,
    ToolCallError,
)
from garrison.resilience import Retry

from ._agents_support import agent_app, call, response, unavailable


@tool
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


class Order(pydantic.BaseModel):
    id: int
    status: str


# -- tool calls and answers ------------------------------------------------------------


async def test_tool_call_then_answer(db_url: str) -> None:
    model = ScriptedModel([call("add", {"a": 2, "b": 3}, call_id="c1"), "It is 5."])
    agent = Agent("calc", model=model, tools=[add], instructions="You add.")
    async with agent_app(db_url, agent) as app:
        result = await agent.run(app, "2+3?", run_id="r")
    assert result.output == "It is 5."
    assert result.agent == "calc"
    assert result.run_id == "r"
    assert result.turns == 2
    assert result.usage.model_calls == 2
    assert result.usage.tool_calls == 1
    assert [m.role for m in result.messages] == ["user", "assistant", "tool", "assistant"]
    assert model.calls[0].tools == ("add",)
    assert model.calls[0].messages == (Message.system("You add."), Message.user("2+3?"))
    assert model.calls[1].messages[-1] == Message("tool", "5", tool_call_id="c1",
                                                  name="add", agent="calc")


async def test_result_messages_carry_no_system_prompt(db_url: str) -> None:
    agent = Agent("plain", model=ScriptedModel(["hi"]), instructions="Be brief.")
    async with agent_app(db_url, agent) as app:
        result = await agent.run(app, "hello")
    assert [m.role for m in result.messages] == ["user", "assistant"]
    assert result.run_id.startswith("r_")


async def test_invalid_arguments_go_back_to_the_model_and_are_repaired(db_url: str) -> None:
    ran: list[tuple[int, int]] = []

    @tool
    def mul(a: int, b: int) -> int:
        """Multiply."""
        ran.append((a, b))
        return a * b

    model = ScriptedModel([call("mul", {"a": "two", "b": 3}, call_id="bad"),
                           call("mul", {"a": 2, "b": 3}, call_id="good"), "6"])
    agent = Agent("calc", model=model, tools=[mul])
    async with agent_app(db_url, agent) as app:
        result = await agent.run(app, "2*3?")
    assert result.output == "6"
    assert ran == [(2, 3)]
    repair = model.calls[1].messages[-1]
    assert (repair.role, repair.tool_call_id, repair.is_error) == ("tool", "bad", True)
    assert repair.content is not None
    assert repair.content.startswith("Error: invalid arguments for mul: a: ")
    assert result.usage.tool_calls == 1


async def test_unknown_tool_goes_back_with_the_known_tools(db_url: str) -> None:
    model = ScriptedModel([call("subtract", {"a": 1}), call("add", {"a": 1, "b": 1}), "2"])
    agent = Agent("calc", model=model, tools=[add])
    async with agent_app(db_url, agent) as app:
        result = await agent.run(app, "1+1?")
    assert result.output == "2"
    told = model.calls[1].messages[-1]
    assert told.is_error
    assert told.content == "Error: there is no tool 'subtract'; the tools are: add."


async def test_tool_call_error_after_max_tool_repairs(db_url: str) -> None:
    model = ScriptedModel(default=call("nope", {}))
    agent = Agent("calc", model=model, tools=[add], max_tool_repairs=2)
    async with agent_app(db_url, agent) as app:
        with pytest.raises(ToolCallError) as caught:
            await agent.run(app, "x", run_id="bad-tools")
        record = await app.handle("bad-tools").record()
    assert len(model.calls) == 3  # the first try and two repairs
    err = caught.value
    assert err.run_id == "bad-tools"
    assert err.agent == "calc"
    assert "there is no tool 'nope'" in err.last_error
    assert record.status in (RunStatus.FAILED, RunStatus.QUARANTINED)


async def test_a_good_round_resets_the_repair_count(db_url: str) -> None:
    model = ScriptedModel([call("nope"), call("add", {"a": 1, "b": 1}), call("nope"),
                           call("add", {"a": 2, "b": 2}), "done"])
    agent = Agent("calc", model=model, tools=[add], max_tool_repairs=1)
    async with agent_app(db_url, agent) as app:
        result = await agent.run(app, "x")
    assert result.output == "done"


async def test_a_failing_tool_is_an_error_result_and_the_run_goes_on(db_url: str) -> None:
    @tool
    def fetch(url: str) -> str:
        """Fetch a URL."""
        raise RuntimeError(f"{url} is down")

    model = ScriptedModel([call("fetch", {"url": "http://x"}, call_id="f1"),
                           "Sorry, it is down."])
    agent = Agent("web", model=model, tools=[fetch])
    async with agent_app(db_url, agent) as app:
        result = await agent.run(app, "get x")
    assert result.output == "Sorry, it is down."
    told = model.calls[1].messages[-1]
    assert told.is_error
    assert told.content == "Error: the tool failed: RuntimeError: http://x is down"


async def test_several_calls_in_one_message_are_answered_in_order(db_url: str) -> None:
    model = ScriptedModel([[call("add", {"a": 1, "b": 1}, call_id="x"),
                            call("add", {"a": 2, "b": 2}, call_id="y")], "done"])
    agent = Agent("calc", model=model, tools=[add])
    async with agent_app(db_url, agent) as app:
        result = await agent.run(app, "x")
    tool_msgs = [(m.tool_call_id, m.content) for m in result.messages if m.role == "tool"]
    assert tool_msgs == [("x", "2"), ("y", "4")]
    assert result.usage.tool_calls == 2


async def test_max_turns_exceeded(db_url: str) -> None:
    model = ScriptedModel(default=lambda messages: call("add", {"a": len(messages), "b": 0}))
    agent = Agent("spin", model=model, tools=[add], max_turns=3)
    async with agent_app(db_url, agent) as app:
        with pytest.raises(MaxTurnsExceeded) as caught:
            await agent.run(app, "x", run_id="spin-1")
    assert len(model.calls) == 3
    assert caught.value.run_id == "spin-1"
    assert "raise max_turns" in str(caught.value)


# -- structured output -----------------------------------------------------------------


async def test_structured_output_is_validated_into_the_type(db_url: str) -> None:
    model = ScriptedModel(['{"id": 7, "status": "shipped"}'])
    agent = Agent("orders", model=model, output_type=Order)
    async with agent_app(db_url, agent) as app:
        result = await agent.run(app, "order 7?", run_id="o")
    assert result.output == Order(id=7, status="shipped")
    assert model.calls[0].output_schema == Order.model_json_schema()


async def test_structured_output_in_a_json_fence_is_accepted(db_url: str) -> None:
    model = ScriptedModel(['```json\n{"id": 1, "status": "new"}\n```'])
    agent = Agent("orders", model=model, output_type=Order)
    async with agent_app(db_url, agent) as app:
        result = await agent.run(app, "order 1?")
    assert result.output == Order(id=1, status="new")


async def test_structured_output_of_a_list_type(db_url: str) -> None:
    agent = Agent("nums", model=ScriptedModel(["[1, 2, 3]"]), output_type=list[int])
    async with agent_app(db_url, agent) as app:
        result = await agent.run(app, "numbers")
    assert result.output == [1, 2, 3]


async def test_invalid_structured_output_is_repaired(db_url: str) -> None:
    model = ScriptedModel(['{"id": "seven"}', '{"id": 7, "status": "shipped"}'])
    agent = Agent("orders", model=model, output_type=Order)
    async with agent_app(db_url, agent) as app:
        result = await agent.run(app, "order 7?")
    assert result.output == Order(id=7, status="shipped")
    repair = model.calls[1].messages[-1]
    assert repair.role == "user"
    assert repair.content is not None
    assert repair.content.startswith("Your answer does not match the required output: ")
    assert "id: " in repair.content
    assert "status: Field required" in repair.content
    assert result.fallbacks == []


async def test_output_falls_back_to_next_model_after_output_retries(db_url: str) -> None:
    weak = ScriptedModel(default="not json", name="weak")
    strong = ScriptedModel(['{"id": 3, "status": "ok"}'], name="strong")
    agent = Agent("orders", model=weak, fallback_models=[strong], output_type=Order,
                  output_retries=1)
    async with agent_app(db_url, agent) as app:
        result = await agent.run(app, "order 3?")
    assert len(weak.calls) == 2  # the answer and one repair
    assert len(strong.calls) == 1
    assert result.output == Order(id=3, status="ok")
    assert result.model == "test:strong"
    assert result.models_used == ["test:weak", "test:strong"]
    assert result.fallbacks == ["test:weak"]


async def test_output_validation_error_when_every_model_fails(db_url: str) -> None:
    first = ScriptedModel(default="nope", name="first")
    second = ScriptedModel(default='{"id": 1}', name="second")
    agent = Agent("orders", model=first, fallback_models=[second], output_type=Order,
                  output_retries=1)
    async with agent_app(db_url, agent) as app:
        with pytest.raises(OutputValidationError) as caught:
            await agent.run(app, "order?", run_id="ov")
    assert len(first.calls) == 2
    assert len(second.calls) == 2
    assert set(caught.value.errors) == {"test:first", "test:second"}
    assert "status: Field required" in caught.value.errors["test:second"]
    assert caught.value.run_id == "ov"


# -- provider failures and fallbacks ---------------------------------------------------


async def test_provider_failure_falls_back_to_the_second_model(db_url: str) -> None:
    primary = ScriptedModel([unavailable("primary", retryable=False)], name="primary")
    backup = ScriptedModel(["served"], name="backup")
    agent = Agent("fb", model=primary, fallback_models=[backup])
    async with agent_app(db_url, agent) as app:
        result = await agent.run(app, "hi")
    assert result.output == "served"
    assert result.model == "test:backup"
    assert result.models_used == ["test:backup"]
    assert result.fallbacks == ["test:primary"]
    assert len(primary.calls) == 1  # not retryable: not retried
    assert backup.calls[0].messages == primary.calls[0].messages


async def test_retryable_failure_is_retried_before_falling_back(db_url: str) -> None:
    primary = ScriptedModel(default=unavailable("primary"), name="primary")
    backup = ScriptedModel(["served"], name="backup")
    agent = Agent("fb", model=primary, fallback_models=[backup],
                  retry=Retry(max_attempts=3, base=0))
    async with agent_app(db_url, agent) as app:
        result = await agent.run(app, "hi")
    assert len(primary.calls) == 3
    assert result.output == "served"
    assert result.fallbacks == ["test:primary"]


async def test_retryable_failure_that_recovers_needs_no_fallback(db_url: str) -> None:
    primary = ScriptedModel([unavailable("primary"), "second try"], name="primary")
    backup = ScriptedModel(["unused"], name="backup")
    agent = Agent("fb", model=primary, fallback_models=[backup],
                  retry=Retry(max_attempts=2, base=0))
    async with agent_app(db_url, agent) as app:
        result = await agent.run(app, "hi")
    assert result.output == "second try"
    assert result.fallbacks == []
    assert backup.calls == []


async def test_without_fallback_run_raises_the_original_provider_error(db_url: str) -> None:
    model = ScriptedModel([unavailable("only", retryable=False, status=503)], name="only")
    agent = Agent("solo", model=model)
    async with agent_app(db_url, agent) as app:
        with pytest.raises(ProviderUnavailable) as caught:
            await agent.run(app, "hi", run_id="down")
        status = await app.handle("down").status()
    err = caught.value
    assert (err.provider, err.model, err.kind, err.retryable, err.status) == (
        "test", "only", "server", False, 503)
    assert status in (RunStatus.FAILED, RunStatus.QUARANTINED)


async def test_last_error_of_the_chain_is_raised(db_url: str) -> None:
    auth = ProviderAuthError("bad key", provider="test", model="b", kind="auth",
                             retryable=False, status=401, retry_after=None)
    first = ScriptedModel([unavailable("a", retryable=False)], name="a")
    second = ScriptedModel([auth], name="b")
    agent = Agent("chain", model=first, fallback_models=[second])
    async with agent_app(db_url, agent) as app:
        with pytest.raises(ProviderAuthError) as caught:
            await agent.run(app, "hi")
    assert caught.value.status == 401


async def test_fallback_within_one_turn_is_not_stopped_by_max_turns(db_url: str) -> None:
    primary = ScriptedModel([unavailable("p", retryable=False)], name="p")
    backup = ScriptedModel(["ok"], name="backup")
    agent = Agent("fb", model=primary, fallback_models=[backup], max_turns=1)
    async with agent_app(db_url, agent) as app:
        result = await agent.run(app, "hi")
    assert result.output == "ok"


# -- idempotency and resumption --------------------------------------------------------


async def test_run_twice_with_same_run_id_returns_same_result(db_url: str) -> None:
    model = ScriptedModel([call("add", {"a": 1, "b": 2}), "3"])
    agent = Agent("calc", model=model, tools=[add])
    async with agent_app(db_url, agent) as app:
        first = await agent.run(app, "1+2?", run_id="same")
        second = await agent.run(app, "1+2?", run_id="same")
    assert second == first
    assert len(model.calls) == 2


async def test_finished_run_is_read_back_by_a_new_app_without_calls(db_url: str) -> None:
    model = ScriptedModel(['{"id": 1, "status": "x"}'])
    agent = Agent("orders", model=model, output_type=Order)
    async with agent_app(db_url, agent) as app:
        first = await agent.run(app, "o", run_id="keep")
    async with agent_app(db_url, agent) as app2:
        again = await agent.run(app2, "o", run_id="keep")
    assert again == first
    assert again.output == Order(id=1, status="x")
    assert len(model.calls) == 1


async def test_resumed_run_does_not_call_the_model_again_for_completed_calls(
        db_url: str) -> None:
    started = asyncio.Event()
    never = asyncio.Event()
    attempts: list[str] = []

    @tool
    async def slow_lookup(key: str) -> str:
        """Look a key up."""
        attempts.append(key)
        if len(attempts) == 1:
            started.set()
            await never.wait()  # the process goes away while this call is in flight
        return f"value of {key}"

    model = ScriptedModel([call("slow_lookup", {"key": "k"}, call_id="c1"), "found it"])
    agent = Agent("looker", model=model, tools=[slow_lookup])
    async with agent_app(db_url, agent) as app:
        handle = await agent.start(app, "look up k", run_id="resume")
        async with asyncio.timeout(5):
            await started.wait()
    async with agent_app(db_url, agent) as app2:
        assert (await app2.handle("resume").record()).status is not RunStatus.COMPLETED
        result = await agent.result(app2.handle("resume"))
    assert handle.run_id == "resume"
    assert result.output == "found it"
    assert len(model.calls) == 2  # the first call answered before the stop: not paid again
    assert attempts == ["k", "k"]  # the interrupted tool call ran again
    assert model.calls[1].messages[-1].content == "value of k"


async def test_history_continues_a_conversation(db_url: str) -> None:
    model = ScriptedModel(["Nice to meet you, Ada.", "Your name is Ada."])
    agent = Agent("chat", model=model, instructions="Be kind.")
    async with agent_app(db_url, agent) as app:
        first = await agent.run(app, "I am Ada.")
        second = await agent.run(app, "What is my name?", history=first.messages)
    sent = model.calls[1].messages
    assert [m.role for m in sent] == ["system", "user", "assistant", "user"]
    assert sent[1].content == "I am Ada."
    assert sent[2].content == "Nice to meet you, Ada."
    assert second.output == "Your name is Ada."
    assert len(second.messages) == 4


async def test_history_as_plain_dicts(db_url: str) -> None:
    model = ScriptedModel(["ok"])
    agent = Agent("chat", model=model)
    history: list[dict[str, Any]] = [{"role": "user", "content": "earlier"},
                                     {"role": "assistant", "content": "noted"}]
    async with agent_app(db_url, agent) as app:
        await agent.run(app, "now", history=history)
    assert [m.content for m in model.calls[0].messages] == ["earlier", "noted", "now"]


async def test_model_settings_reach_the_model(db_url: str) -> None:
    model = ScriptedModel(["ok"])
    settings = ModelSettings(temperature=0.2, max_tokens=64, top_p=0.9, stop=("END",),
                             seed=11, extra={"user": "u1"})
    agent = Agent("tuned", model=model, model_settings=settings)
    async with agent_app(db_url, agent) as app:
        await agent.run(app, "hi")
    assert model.calls[0].settings == settings


async def test_usage_and_cost_add_up_across_calls(db_url: str) -> None:
    model = ScriptedModel([
        response(calls=[("c1", "add", {"a": 1, "b": 2})], input_tokens=1000,
                 output_tokens=100),
        response("3", input_tokens=2000, output_tokens=50)], name="priced")
    prices = PriceTable({"priced": Price(input_per_mtok=1.0, output_per_mtok=4.0)},
                        defaults=False)
    agent = Agent("calc", model=model, tools=[add], prices=prices)
    async with agent_app(db_url, agent) as app:
        result = await agent.run(app, "1+2?")
    assert result.usage == Usage(input_tokens=3000, output_tokens=150, model_calls=2,
                                 tool_calls=1)
    assert result.cost_usd == pytest.approx((3000 * 1.0 + 150 * 4.0) / 1_000_000)


async def test_unpriced_model_costs_nothing(db_url: str) -> None:
    agent = Agent("free", model=ScriptedModel(["ok"], name="nobody-prices-this"))
    async with agent_app(db_url, agent) as app:
        result = await agent.run(app, "hi")
    assert result.cost_usd == 0.0
    assert result.usage.total_tokens > 0


def test_price_table_first_match_wins_and_defaults_fill_in() -> None:
    table = PriceTable({"gpt-4o-mini-2024*": (0.1, 0.2)})
    assert table.price("openai:gpt-4o-mini-2024-07-18") == Price(0.1, 0.2)
    assert table.price("gpt-4o-mini") == Price(0.15, 0.60)
    assert table.price("gpt-4o") == Price(2.50, 10.00)
    assert PriceTable(defaults=False).price("gpt-4o") is None
    assert table.cost_usd("gpt-4o", Usage(1_000_000, 1_000_000)) == pytest.approx(12.5)
