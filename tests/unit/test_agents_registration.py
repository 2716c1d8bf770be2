"""How agents register on an app, and what their results look like after a handoff."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel

from garrison import Garrison
from garrison.agents import Agent, ScriptedModel
from garrison.errors import ConfigurationError


class Invoice(BaseModel):
    invoice_id: str
    paid: bool


async def test_two_agent_objects_with_one_name_on_an_app_is_a_clear_error(
        tmp_path: Path) -> None:
    app = Garrison(f"sqlite:///{tmp_path}/g.db")
    app.add_agent(Agent("support", model=ScriptedModel(["a"])))
    app.add_agent(Agent("other", model=ScriptedModel(["b"])))
    with pytest.raises(ConfigurationError, match="another Agent named 'support'"):
        app.add_agent(Agent("support", model=ScriptedModel(["c"])))


async def test_registering_the_same_agent_twice_is_harmless(tmp_path: Path) -> None:
    agent = Agent("support", model=ScriptedModel(["hi"]))
    app = Garrison(f"sqlite:///{tmp_path}/g.db")
    app.add_agent(agent)
    app.add_agent(agent)
    async with app:
        assert (await agent.run(app, "hello")).output == "hi"


async def test_output_after_a_handoff_has_the_answering_agents_type(tmp_path: Path) -> None:
    billing = Agent("billing", model=ScriptedModel(['{"invoice_id": "9", "paid": true}']),
                    output_type=Invoice)
    triage = Agent("triage", model=ScriptedModel([{"name": "transfer_to_billing"}]),
                   handoffs=[billing])
    app = Garrison(f"sqlite:///{tmp_path}/g.db")
    app.add_agent(triage)
    async with app:
        res = await triage.run(app, "is invoice 9 paid?")
    assert res.agent == "billing"
    assert res.output == Invoice(invoice_id="9", paid=True)


def test_bad_agent_definitions_name_the_fix() -> None:
    with pytest.raises(ConfigurationError, match="letters, digits"):
        Agent("no spaces", model=ScriptedModel())
    with pytest.raises(ConfigurationError, match="max_turns"):
        Agent("a", model=ScriptedModel(), max_turns=0)
    with pytest.raises(ConfigurationError, match="'openai:NAME'"):
        Agent("a", model=42)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="unknown provider 'mistral'"):
        Agent("a", model="mistral:large")
    with pytest.raises(ConfigurationError, match="write 'provider:model'"):
        Agent("a", model="gpt-4o")
    with pytest.raises(ConfigurationError, match="is not a tool"):
        Agent("a", model=ScriptedModel(), tools=[print])  # type: ignore[list-item]
    model = ScriptedModel()
    with pytest.raises(ConfigurationError, match="names a model twice"):
        Agent("a", model=model, fallback_models=[model])
