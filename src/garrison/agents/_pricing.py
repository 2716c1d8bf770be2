"""Prices per million tokens, to turn usage into cost. Configurable; defaults for
common models (list prices as of 2026; check your contract and override)."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass

from garrison._log import get_logger
from garrison.agents._messages import Usage
from garrison.errors import ConfigurationError

__all__ = ["DEFAULT_PRICES", "Price", "PriceTable"]

log = get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Price:
    """US dollars per million input and output tokens."""

    input_per_mtok: float
    output_per_mtok: float


DEFAULT_PRICES: dict[str, Price] = {
    "gpt-4o-mini*": Price(0.15, 0.60),
    "gpt-4o*": Price(2.50, 10.00),
    "gpt-4.1-nano*": Price(0.10, 0.40),
    "gpt-4.1-mini*": Price(0.40, 1.60),
    "gpt-4.1*": Price(2.00, 8.00),
    "gpt-5-mini*": Price(0.25, 2.00),
    "gpt-5*": Price(1.25, 10.00),
    "claude-haiku-4*": Price(1.00, 5.00),
    "claude-sonnet-4*": Price(3.00, 15.00),
    "claude-opus-4*": Price(15.00, 75.00),
}


class PriceTable:
    """Model-name patterns (fnmatch, first match wins, most specific first) to prices.

    `PriceTable({"my-model": Price(0.5, 1.5)})` adds to the defaults;
    `PriceTable(..., defaults=False)` replaces them. A model with no price costs 0 and
    is logged once (`agent.price_unknown`).
    """

    def __init__(self, prices: Mapping[str, Price | tuple[float, float]] | None = None, *,
                 defaults: bool = True) -> None:
        table: dict[str, Price] = {}
        for pattern, price in (prices or {}).items():
            if isinstance(price, tuple):
                price = Price(*price)
            if price.input_per_mtok < 0 or price.output_per_mtok < 0:
                raise ConfigurationError(f"PriceTable[{pattern!r}]: prices are >= 0 $/Mtok")
            table[pattern] = price
        if defaults:
            for pattern, price in DEFAULT_PRICES.items():
                table.setdefault(pattern, price)
        self._prices = table
        self._unknown: set[str] = set()

    def price(self, model: str) -> Price | None:
        """The price of `model` (a provider's name for it, without "provider:")."""
        name = model.split(":", 1)[-1]
        for pattern, price in self._prices.items():
            if fnmatch.fnmatchcase(name, pattern):
                return price
        return None

    def cost_usd(self, model: str, usage: Usage) -> float:
        """What `usage` of `model` costs, in US dollars."""
        price = self.price(model)
        if price is None:
            if model not in self._unknown:
                self._unknown.add(model)
                log.debug("agent.price_unknown", model=model)
            return 0.0
        return (usage.input_tokens * price.input_per_mtok
                + usage.output_tokens * price.output_per_mtok) / 1_000_000
