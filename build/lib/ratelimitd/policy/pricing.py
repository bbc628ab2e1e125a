"""Prices: model -> the integer prices the engine charges with.

Prices are configured in USD per 1M tokens (`ModelPrice`) and kept as integer micro-USD per
1M tokens (`Prices`), so tokens x price / 1000 is nano-USD: the Lua charges integers, floats
stay at the JSON edge (see ratelimitd.units).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from ratelimitd.units import usd_to_micro


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per 1M tokens, as configured."""

    input: float
    output: float
    cached_input: float | None = None


# What a model not in the price table costs, unless configured otherwise
DEFAULT_MODEL_PRICE: Final = ModelPrice(3.0, 15.0)
DEFAULT_PRICES: Final = {
    "gpt-4": ModelPrice(30.0, 60.0),
    "gpt-3.5-turbo": ModelPrice(1.5, 2.0),
    "claude-3-opus": ModelPrice(15.0, 75.0),
    "gpt-4o": ModelPrice(2.5, 10.0, 1.25),
}


@dataclass(frozen=True, slots=True)
class Prices:
    """Micro-USD per 1M tokens: tokens x price / 1000 is nano-USD."""

    input: int
    output: int
    cached_input: int

    @classmethod
    def of(cls, price: ModelPrice) -> Prices:
        cached = price.input if price.cached_input is None else price.cached_input
        return cls(input=usd_to_micro(price.input), output=usd_to_micro(price.output),
                   cached_input=usd_to_micro(cached))


@dataclass(frozen=True, slots=True)
class PriceTable:
    models: dict[str, Prices]
    default: Prices | None          # None: unknown models are refused

    @classmethod
    def build(cls, models: Mapping[str, ModelPrice], default: ModelPrice | None) -> PriceTable:
        """default None: a model not in `models` is refused."""
        return cls({name: Prices.of(p) for name, p in models.items()},
                   None if default is None else Prices.of(default))

    def for_model(self, model: str) -> Prices | None:
        """The model's prices; a dated snapshot ("gpt-4o-2024-08-06", "gpt-4-0613") takes the
        prices of the name it extends, but another model ("gpt-4o-mini") does not. None when
        the model is unknown and unknown models are refused."""
        exact = self.models.get(model)
        if exact is not None:
            return exact
        best = max((name for name in self.models
                    if model.startswith(name + "-") and model[len(name) + 1:][:1].isdigit()),
                   key=len, default=None)
        return self.models[best] if best is not None else self.default
