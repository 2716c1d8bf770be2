"""Fakes that ship with Garrison for users' tests: a clock you move by hand, in-process
model fakes (`ScriptedModel`, `FunctionModel`), and a local OpenAI/Anthropic-compatible
LLM server with deterministic scripts and fault injection.

`LLMServer` and `create_app` need the `llm-server` extra (starlette, uvicorn); they are
imported on first use, so `import garrison.testing` works without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from garrison.testing._clock import FakeClock
from garrison.testing._faults import FAULT_GRAMMAR, Fault, Faults
from garrison.testing._script import Rule, Script, ScriptedReply, ScriptedToolCall, fingerprint

if TYPE_CHECKING:
    from garrison.agents import FunctionModel, ScriptedModel
    from garrison.testing._llm_server import LLMServer, create_app

__all__ = [
    "FAULT_GRAMMAR",
    "FakeClock",
    "Fault",
    "Faults",
    "FunctionModel",
    "LLMServer",
    "Rule",
    "Script",
    "ScriptedModel",
    "ScriptedReply",
    "ScriptedToolCall",
    "create_app",
    "fingerprint",
]

_LAZY = frozenset({"LLMServer", "create_app"})


def __getattr__(name: str) -> Any:
    # starlette and uvicorn load only when the server is asked for (the llm-server extra).
    if name in _LAZY:
        from garrison.testing import _llm_server

        return getattr(_llm_server, name)
    if name in ("ScriptedModel", "FunctionModel"):  # in-process model fakes (agents layer)
        import garrison.agents

        return getattr(garrison.agents, name)
    raise AttributeError(f"module 'garrison.testing' has no attribute {name!r}")
