"""The durable execution engine: workflows, steps, replay, timers, waits, the worker."""

from __future__ import annotations

from garrison.engine._annotate import annotate, record_event, replaying
from garrison.engine._app import Garrison, new_run_id
from garrison.engine._clock import Clock, SystemClock
from garrison.engine._context import Context, StepInfo, current_step, remaining
from garrison.engine._handle import RunHandle
from garrison.engine._hooks import EngineHooks
from garrison.engine._queues import Queue
from garrison.engine._registry import RetryPolicy, StepDef, WorkflowDef
from garrison.engine._replay import ReplayReport
from garrison.engine._stream import publish

__all__ = [
    "Clock",
    "Context",
    "EngineHooks",
    "Garrison",
    "Queue",
    "ReplayReport",
    "RetryPolicy",
    "RunHandle",
    "StepDef",
    "StepInfo",
    "SystemClock",
    "WorkflowDef",
    "annotate",
    "current_step",
    "new_run_id",
    "publish",
    "record_event",
    "remaining",
    "replaying",
]
