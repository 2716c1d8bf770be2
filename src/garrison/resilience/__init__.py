"""Resilience policies that attach to steps by composition, or wrap any awaitable.

```python
payments = CircuitBreaker("payments", failure_rate=0.5, window=20, min_calls=10)

@app.step(retry=Retry(max_attempts=5, budget=RetryBudget("payments")),
          breaker=payments, bulkhead=Bulkhead("payments", max_concurrent=10), timeout=5.0)
async def charge(order_id: str, cents: int) -> str: ...

answer = await Fallback([ask_primary, ask_secondary, cached_answer])(question)
```
Failed runs end QUARANTINED (`@app.workflow(quarantine=True)`, the default) and
`app.redrive(run_id)` continues them; `@app.workflow(timeout=)` sets a run deadline that
steps and children see through `garrison.remaining()`.
"""

from __future__ import annotations

from garrison.resilience._breaker import CircuitBreaker
from garrison.resilience._fallback import Fallback, Served
from garrison.resilience._limits import Bulkhead, RateLimiter
from garrison.resilience._metrics import Reliability, reliability
from garrison.resilience._retry import Retry, RetryBudget, retry_after_s
from garrison.resilience._supervisor import Child, Supervisor

__all__ = [
    "Bulkhead",
    "Child",
    "CircuitBreaker",
    "Fallback",
    "RateLimiter",
    "Reliability",
    "Retry",
    "RetryBudget",
    "Served",
    "Supervisor",
    "reliability",
    "retry_after_s",
]
