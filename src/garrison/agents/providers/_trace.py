"""The W3C trace context of the current span as HTTP headers, if OpenTelemetry is in use.

The agents do not depend on OpenTelemetry: the propagator is used only when the
application has imported it already (`garrison.observability.instrument` does), so a
process without telemetry never imports it and pays one dictionary lookup per call.
"""

from __future__ import annotations

import sys

__all__ = ["trace_headers"]


def trace_headers() -> dict[str, str] | None:
    """`traceparent` (and `tracestate`) of the active span; None without one."""
    if "opentelemetry.trace" not in sys.modules:  # not imported: no span can be active
        return None
    from opentelemetry import propagate

    carrier: dict[str, str] = {}
    propagate.inject(carrier)  # nothing without an active, valid span context
    return carrier or None
