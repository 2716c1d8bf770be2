"""Pins the public surface: later issues build on these names."""

from __future__ import annotations

import garrison
import garrison.agents
import garrison.engine
import garrison.store
import garrison.testing


def test_top_level_names_are_pinned() -> None:
    assert garrison.__all__ == [
        "AbortedError", "BulkheadFull", "CircuitOpenError", "Clock", "ConfigurationError",
        "Context", "DeadlineExceeded", "EngineHooks", "Garrison", "GarrisonError",
        "LeaseLostError", "NonDeterminismError", "NotInWorkflowError", "Queue",
        "ResultTimeoutError", "RetryPolicy", "RunDeduplicatedError", "RunHandle",
        "RunNotFoundError", "RunRecord", "RunStatus", "SchemaVersionError",
        "SerializationError", "StepFailed", "StepInfo", "StepRecord", "Store", "StoreError",
        "StoreLockedError", "StreamRecord", "WorkflowCancelled", "WorkflowConflictError",
        "WorkflowError", "WorkflowFailed", "__version__", "current_step", "publish",
        "remaining",
    ]
    for name in garrison.__all__:
        assert hasattr(garrison, name), name


def test_every_package_exports_a_sorted_all() -> None:
    for module in (garrison, garrison.engine, garrison.store, garrison.agents,
                   garrison.testing):
        assert module.__all__ == sorted(module.__all__), module.__name__


def test_run_status_is_a_str_enum_with_the_documented_members() -> None:
    assert [s.value for s in garrison.RunStatus] == [
        "PENDING", "RUNNING", "WAITING", "COMPLETED", "FAILED", "CANCELLED",
        "QUARANTINED"]
    assert garrison.RunStatus.COMPLETED == "COMPLETED"
    assert isinstance(garrison.RunStatus.FAILED, str)


def test_every_error_descends_from_garrison_error() -> None:
    for name in garrison.__all__:
        obj = getattr(garrison, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, garrison.GarrisonError), name


def test_agents_names_are_pinned() -> None:
    assert garrison.agents.__all__ == [
        "Agent", "AgentError", "AgentEvent", "AgentResult", "AgentTool", "AnthropicModel",
        "ApprovalRequested", "Budget", "BudgetExceeded", "DEFAULT_PRICES", "FinalOutput",
        "FunctionModel", "Handoff", "HandoffEvent", "LoopDetected", "LoopGuard",
        "MaxTurnsExceeded", "Message", "Model", "ModelCall", "ModelResponse", "ModelSettings",
        "OpenAIModel", "OutputValidationError", "Price", "PriceTable", "ScriptedModel",
        "StreamReset", "TextDelta", "Tool", "ToolCall", "ToolCallError", "ToolCallEvent",
        "ToolContext", "ToolResultEvent", "Usage", "resolve_model", "tool",
    ]
    for name in garrison.agents.__all__:
        assert getattr(garrison.agents, name) is not None, name
    for name in garrison.testing.__all__:
        assert getattr(garrison.testing, name) is not None, name


def test_observability_names_are_pinned() -> None:
    import garrison.observability

    assert garrison.observability.__all__ == [
        "ControlCharEscaper", "Instrumentation", "MASK", "Redactor", "SECRET_KEY_PARTS",
        "add_record_extras", "add_run_context", "add_trace_context", "configure_logging",
        "escape_control", "instrument",
        "is_secret_key", "mask_secrets", "mask_text", "mask_value", "no_redaction",
    ]
    for name in garrison.observability.__all__:
        assert getattr(garrison.observability, name) is not None, name
