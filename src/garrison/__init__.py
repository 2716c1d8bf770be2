"""Garrison: durable, supervised, observable and governed execution for AI agents.

```python
from garrison import Garrison, Context

app = Garrison("sqlite:///garrison.db")

@app.step()
async def charge(order_id: str, cents: int) -> str: ...

@app.workflow()
async def refund(ctx: Context, order_id: str, cents: int) -> dict: ...
```
"""

from __future__ import annotations

from garrison.engine import (
    Clock,
    Context,
    EngineHooks,
    Garrison,
    Queue,
    RetryPolicy,
    RunHandle,
    StepInfo,
    current_step,
    publish,
    remaining,
)
from garrison.errors import (
    AbortedError,
    BulkheadFull,
    CircuitOpenError,
    ConfigurationError,
    DeadlineExceeded,
    GarrisonError,
    LeaseLostError,
    NonDeterminismError,
    NotInWorkflowError,
    ResultTimeoutError,
    RunDeduplicatedError,
    RunNotFoundError,
    SchemaVersionError,
    SerializationError,
    StepFailed,
    StoreError,
    StoreLockedError,
    WorkflowCancelled,
    WorkflowConflictError,
    WorkflowError,
    WorkflowFailed,
)
from garrison.store import RunRecord, RunStatus, StepRecord, Store, StreamRecord

__version__ = "0.1.0"

__all__ = [
    "AbortedError",
    "BulkheadFull",
    "CircuitOpenError",
    "Clock",
    "ConfigurationError",
    "Context",
    "DeadlineExceeded",
    "EngineHooks",
    "Garrison",
    "GarrisonError",
    "LeaseLostError",
    "NonDeterminismError",
    "NotInWorkflowError",
    "Queue",
    "ResultTimeoutError",
    "RetryPolicy",
    "RunDeduplicatedError",
    "RunHandle",
    "RunNotFoundError",
    "RunRecord",
    "RunStatus",
    "SchemaVersionError",
    "SerializationError",
    "StepFailed",
    "StepInfo",
    "StepRecord",
    "Store",
    "StoreError",
    "StoreLockedError",
    "StreamRecord",
    "WorkflowCancelled",
    "WorkflowConflictError",
    "WorkflowError",
    "WorkflowFailed",
    "__version__",
    "current_step",
    "publish",
    "remaining",
]
