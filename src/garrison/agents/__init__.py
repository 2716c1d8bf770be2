"""Durable agents: an agent run is a workflow, each model and tool call a journaled step.

```python
from garrison.agents import Agent, Budget, tool

@tool
async def lookup_order(order_id: str) -> dict:
    \"\"\"Look up an order by id.\"\"\"

billing = Agent("billing", model="openai:gpt-4o-mini", tools=[lookup_order],
                budget=Budget(tokens=20_000, cost_usd=0.50, tool_calls=20))
app.add_agent(billing)
async with app:
    res = await billing.run(app, "where is order 42?", run_id="t-42")
```
A crash mid-conversation resumes without paying again for model calls that answered
and without repeating a completed tool call (docs/agents.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from garrison.agents._agent import Agent, AgentResult, AgentTool, Handoff
from garrison.agents._budget import Budget, LoopGuard
from garrison.agents._events import (
    AgentEvent,
    ApprovalRequested,
    FinalOutput,
    HandoffEvent,
    StreamReset,
    TextDelta,
    ToolCallEvent,
    ToolResultEvent,
)
from garrison.agents._fakes import FunctionModel, ModelCall, ScriptedModel
from garrison.agents._messages import Message, ModelResponse, ModelSettings, ToolCall, Usage
from garrison.agents._model import Model, resolve_model
from garrison.agents._pricing import DEFAULT_PRICES, Price, PriceTable
from garrison.agents._tools import Tool, ToolContext, tool
from garrison.errors import (
    AgentError,
    BudgetExceeded,
    LoopDetected,
    MaxTurnsExceeded,
    OutputValidationError,
    ToolCallError,
)

if TYPE_CHECKING:  # imported lazily below: they need their SDKs
    from garrison.agents.providers.anthropic import AnthropicModel
    from garrison.agents.providers.openai import OpenAIModel

__all__ = [
    "Agent",
    "AgentError",
    "AgentEvent",
    "AgentResult",
    "AgentTool",
    "AnthropicModel",
    "ApprovalRequested",
    "Budget",
    "BudgetExceeded",
    "DEFAULT_PRICES",
    "FinalOutput",
    "FunctionModel",
    "Handoff",
    "HandoffEvent",
    "LoopDetected",
    "LoopGuard",
    "MaxTurnsExceeded",
    "Message",
    "Model",
    "ModelCall",
    "ModelResponse",
    "ModelSettings",
    "OpenAIModel",
    "OutputValidationError",
    "Price",
    "PriceTable",
    "ScriptedModel",
    "StreamReset",
    "TextDelta",
    "Tool",
    "ToolCall",
    "ToolCallError",
    "ToolCallEvent",
    "ToolContext",
    "ToolResultEvent",
    "Usage",
    "resolve_model",
    "tool",
]


def __getattr__(name: str) -> object:
    # The providers import their SDKs: only when asked for (pip install 'garrison[agents]').
    if name == "OpenAIModel":
        from garrison.agents.providers.openai import OpenAIModel

        return OpenAIModel
    if name == "AnthropicModel":
        from garrison.agents.providers.anthropic import AnthropicModel

        return AnthropicModel
    raise AttributeError(f"module 'garrison.agents' has no attribute {name!r}")
