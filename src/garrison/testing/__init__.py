"""Fakes that ship with Garrison for users' tests: a clock you move by hand."""

from __future__ import annotations

from garrison.testing._clock import FakeClock

__all__ = ["FakeClock"]
