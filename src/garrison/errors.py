"""Every error Garrison raises, in one tree.

```
GarrisonError
├── ConfigurationError          bad URL, bad option, wrong registration
├── StoreError                  the store could not read or write
│   ├── StoreLockedError        another worker process holds the embedded database
│   ├── SchemaVersionError      the database was written by a newer Garrison
│   └── LeaseLostError          another worker took this run over: the write was refused
├── SerializationError          a value cannot be stored as JSON (names type and step)
├── RunNotFoundError            no run with that id
├── WorkflowError               something is wrong with one run
│   ├── WorkflowConflictError   run id reused for another workflow
│   ├── RunDeduplicatedError    a queue already holds an unfinished run with this dedup id
│   ├── NonDeterminismError     code and journal disagree at a position
│   └── NotInWorkflowError      a workflow-only call made outside a workflow
├── WorkflowFailed              the run ended FAILED: carries the error as data
├── WorkflowCancelled           the run ended CANCELLED
├── StepFailed                  a journaled step error whose type is not loaded here
├── AbortedError                run code raised CancelledError uncancelled, or SystemExit
├── CircuitOpenError            a circuit breaker refused the call (`breaker`, `retry_after`)
├── BulkheadFull                a bulkhead had no place within its wait (`bulkhead`)
├── RateLimited                 a rate limiter had no token within its wait (`retry_after`)
├── DeadlineExceeded            a step, run or call went past its deadline (a TimeoutError)
├── FallbackExhausted           every alternative of a Fallback failed
├── SupervisorEscalated         a supervisor's children restarted too often: it gave up
├── ResultTimeoutError          `RunHandle.result(timeout=...)` gave up waiting
├── ProviderError               a model provider refused or failed a call (`retryable`)
│   ├── ProviderRateLimited     429: slow down (`retry_after`)
│   ├── ProviderUnavailable     5xx, timeout, connection reset: try again or elsewhere
│   ├── ProviderAuthError       bad or missing credentials: fix the key
│   ├── ContextTooLong          the conversation does not fit the model's context
│   ├── ContentFiltered         the provider's content filter blocked the answer
│   ├── InvalidModelRequest     the provider rejected the request as malformed
│   └── MalformedResponse       the provider's answer could not be read
└── AgentError                  an agent run stopped by one of its own rules
    ├── BudgetExceeded          a token, cost or tool-call budget is spent (`budget`)
    ├── LoopDetected            the same calls keep repeating (`calls`)
    ├── MaxTurnsExceeded        more model calls than `max_turns`
    ├── OutputValidationError   no model produced output matching `output_type`
    └── ToolCallError           the model kept calling tools wrongly past the repairs
```

Ids are attributes (`run_id`, `position`, `step_name`); messages name the thing and the fix.
Every error pickles through `__reduce__` so it can cross process boundaries intact.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AbortedError",
    "AgentError",
    "BudgetExceeded",
    "BulkheadFull",
    "CircuitOpenError",
    "ConfigurationError",
    "ContentFiltered",
    "ContextTooLong",
    "DeadlineExceeded",
    "FallbackExhausted",
    "GarrisonError",
    "InvalidModelRequest",
    "LeaseLostError",
    "LoopDetected",
    "MalformedResponse",
    "MaxTurnsExceeded",
    "NonDeterminismError",
    "NotInWorkflowError",
    "OutputValidationError",
    "ProviderAuthError",
    "ProviderError",
    "ProviderRateLimited",
    "ProviderUnavailable",
    "RateLimited",
    "ResultTimeoutError",
    "RunDeduplicatedError",
    "RunNotFoundError",
    "SchemaVersionError",
    "SerializationError",
    "StepFailed",
    "StoreError",
    "StoreLockedError",
    "SupervisorEscalated",
    "ToolCallError",
    "WorkflowCancelled",
    "WorkflowConflictError",
    "WorkflowError",
    "WorkflowFailed",
]


class GarrisonError(Exception):
    """Root of every error Garrison raises."""

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self._fields = fields
        for key, value in fields.items():
            setattr(self, key, value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self._fields))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls: type[GarrisonError], message: str, fields: dict[str, Any]) -> GarrisonError:
    error = cls.__new__(cls)
    GarrisonError.__init__(error, message, **fields)
    return error


class ConfigurationError(GarrisonError):
    """A URL, an option or a registration is wrong; the message says which and how to fix it."""


class StoreError(GarrisonError):
    """The store could not read or write. Nothing was half-written: the batch was rolled back."""


class StoreLockedError(StoreError):
    """Another worker process holds this embedded database (`pid` attribute when known)."""


class SchemaVersionError(StoreError):
    """The database schema is newer than this Garrison understands (`found`, `supported`)."""


class LeaseLostError(StoreError):
    """This worker's lease on `run_id` ended (it expired and another worker claimed the run,
    or the worker handed it back): the write was refused in its own transaction."""


class SerializationError(GarrisonError):
    """A value cannot be stored as JSON. Attributes: `type_name`, `what`, `run_id`, `step_name`."""


class RunNotFoundError(GarrisonError):
    """No run with this `run_id` exists in the store."""


class WorkflowError(GarrisonError):
    """Something is wrong with one run (`run_id`)."""


class WorkflowConflictError(WorkflowError):
    """A run id already belongs to a run of another workflow (`existing`, `requested`)."""


class RunDeduplicatedError(WorkflowError):
    """`app.start(..., dedup_id=)`: the queue already holds an unfinished run with this
    dedup id (`queue`, `dedup_id`, `existing_run_id`: pass it to `app.handle`)."""


class NonDeterminismError(WorkflowError):
    """The workflow code and its journal disagree at `position` (`journal`, `code`)."""


class NotInWorkflowError(WorkflowError):
    """A call that only makes sense inside a running workflow was made outside one."""


class WorkflowFailed(GarrisonError):
    """A run ended FAILED; the error is data: `error_type`, `error_message`, `traceback`."""


class WorkflowCancelled(GarrisonError):
    """A run ended CANCELLED (`run_id`)."""


class StepFailed(GarrisonError):
    """A step's journaled error whose exception class is not loaded in this process.

    Attributes: `error_type` (module-qualified name), `error_message`, `traceback`.
    """


class AbortedError(GarrisonError):
    """A step or a workflow body raised what would otherwise stop more than its own
    work: `CancelledError` while its run was not being cancelled (a task it awaited was
    cancelled elsewhere, a library's own timeout), or `SystemExit` (`sys.exit`, a CLI
    library's exit). Handled as the code's failure (journaled, retried per the step's
    policy), with the original as `__cause__`; `raised` names it."""


class ResultTimeoutError(GarrisonError):
    """`RunHandle.result(timeout=...)` stopped waiting; the run itself goes on (`run_id`)."""


class CircuitOpenError(GarrisonError):
    """A circuit breaker refused the call. Attributes: `breaker` (its name), `state`,
    `retry_after` (seconds until it lets a trial call through, when OPEN)."""


class BulkheadFull(GarrisonError):
    """A bulkhead had no free place within its `max_wait` (`bulkhead`, `max_concurrent`)."""


class RateLimited(GarrisonError):
    """A rate limiter had no token within its `max_wait` (`limiter`, `retry_after`)."""


class DeadlineExceeded(GarrisonError, TimeoutError):
    """A step attempt, a run or a call went past its deadline; the work was cancelled.
    A `TimeoutError`, so `Retry(retry_on=(TimeoutError,))` covers it."""


class FallbackExhausted(GarrisonError):
    """Every alternative of a `Fallback` failed (`errors`: (name, repr) pairs)."""


class SupervisorEscalated(GarrisonError):
    """A supervisor exceeded its restart intensity, stopped its children and failed
    (`supervisor`, `child_run_id`: the child whose end was one too many)."""


class ProviderError(GarrisonError):
    """A model provider refused or failed a call. Attributes: `provider`, `model`,
    `status` (HTTP status or None), `kind` ("rate_limit", "server", "timeout",
    "connection", "auth", "context_length", "content_filter", "invalid_request",
    "malformed"), `retryable` (whether the same call may succeed later: retries and
    fallbacks read this, never the message) and `retry_after` (seconds the provider
    asked for, or None)."""


class ProviderRateLimited(ProviderError):
    """HTTP 429: the provider asks to slow down (`retry_after`); retryable."""


class ProviderUnavailable(ProviderError):
    """A 5xx answer, a timeout or a dropped connection; retryable, or served elsewhere."""


class ProviderAuthError(ProviderError):
    """The provider refused the credentials (401/403); not retryable: fix the key."""


class ContextTooLong(ProviderError):
    """The conversation does not fit the model's context window; not retryable as is
    (a fallback with a larger context may serve it)."""


class ContentFiltered(ProviderError):
    """The provider's content filter blocked the request or the answer."""


class InvalidModelRequest(ProviderError):
    """The provider rejected the request (400/404/422): a bug or a wrong model name."""


class MalformedResponse(ProviderError):
    """The provider's answer could not be read (bad JSON, a cut stream); retryable."""


class AgentError(GarrisonError):
    """An agent run stopped by one of its own rules (`run_id`, `agent`)."""


class BudgetExceeded(AgentError):
    """A budget of the run is spent (`budget`: "tokens", "cost_usd", "tool_calls" or
    "model_calls"; `limit`; `used`). Checked before each model and tool call."""


class LoopDetected(AgentError):
    """The agent repeats itself: the same tool call with the same arguments, or a cycle
    of calls (`calls`: the repeated calls as "name(args)")."""


class MaxTurnsExceeded(AgentError):
    """The run made `max_turns` model calls without a final answer."""


class OutputValidationError(AgentError):
    """No model of the chain produced output matching the agent's `output_type` within
    its repairs (`errors`: the last validation error per model)."""


class ToolCallError(AgentError):
    """The model kept calling unknown tools or passing invalid arguments after
    `max_tool_repairs` rounds of being told what was wrong (`last_error`)."""
