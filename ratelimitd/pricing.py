"""Price table: model -> integer prices the engine charges with.

Prices are configured in USD per 1M tokens and kept as integer micro-USD per 1M tokens, so
tokens x price / 1000 is nano-USD: the scripts charge integers, floats stay at the JSON edge.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from ratelimitd.config import ModelPrice, PricingConfig
from ratelimitd.engine import Prices
from ratelimitd.policy import NANO_PER_USD

_MICRO: Final = 1_000_000


def to_prices(price: ModelPrice) -> Prices:
    cached = price.input if price.cached_input is None else price.cached_input
    return Prices(input=round(price.input * _MICRO), output=round(price.output * _MICRO),
                  cached_input=round(cached * _MICRO))


def nano_to_usd(nano: int) -> float:
    return nano / NANO_PER_USD


@dataclass(frozen=True, slots=True)
class PriceTable:
    models: dict[str, Prices]
    default: Prices | None          # None: unknown models are refused

    @classmethod
    def from_config(cls, config: PricingConfig) -> PriceTable:
        models = {name: to_prices(p) for name, p in config.models.items()}
        default = to_prices(config.default) if config.unknown_model == "default" else None
        return cls(models, default)

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
