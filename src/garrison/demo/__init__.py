"""`garrison demo`: a batch of order workflows survives the SIGKILL of its worker."""

from __future__ import annotations

__all__: list[str] = []
