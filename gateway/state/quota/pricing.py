"""What a request costs, and the UTC day and month its spend counts against.

Costs are integer micro-units (millionths) of ``gateway.pricing.currency``. A price "per 1M tokens" in
currency units is exactly micro-units per token, so a request costs
``prompt_tokens * input_price + completion_tokens * output_price`` micro-units, rounded up to a whole
micro-unit. Prices are held as integer micro-units per 1M tokens, so the arithmetic is exact integers:
the same figure in the stores, the ``done`` message, the log line and ``igw_cost_total``.

Rounding up keeps the reservation at admission (prompt bound + max_tokens) an upper bound of the settled
cost (the real prompt + the tokens generated), so a settle never charges more than was reserved.
"""

from __future__ import annotations

import calendar
import datetime
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from igw_common.config import ModelPrice, PoolConfig, PricingConfig

MICROS = 1_000_000


def to_micros(units: float) -> int:
    """Currency units (config) -> integer micro-units."""
    return round(units * MICROS)


def format_micros(micros: int, currency: str) -> str:
    return f"{micros / MICROS:.6f}".rstrip("0").rstrip(".") + f" {currency}"


def _micros(price: ModelPrice) -> tuple[int, int]:
    return to_micros(price.input_per_million), to_micros(price.output_per_million)


class Pricing:
    def __init__(self, cfg: PricingConfig, pools: Sequence[PoolConfig] = ()):
        self.currency = cfg.currency
        # Micro-units per 1M tokens: integers, so costs are exact.
        self._prices = {p.model: _micros(p) for p in cfg.models}
        self._default = _micros(cfg.default)
        # A pool with its own price (a cloud provider's) charges it for every model it serves.
        self._pools = {p.name: _micros(p.price) for p in pools if p.price is not None}

    def prices(self, model: str, pool: str = "") -> tuple[int, int]:
        return self._pools.get(pool) or self._prices.get(model, self._default)

    def cost(self, model: str, prompt_tokens: int, completion_tokens: int, pool: str = "") -> int:
        """Micro-units, rounded up, for tokens served by ``pool`` ("" = not served by a pool yet: the model's)."""
        p_in, p_out = self.prices(model, pool)
        total = max(0, prompt_tokens) * p_in + max(0, completion_tokens) * p_out
        return -(-total // MICROS)

    def most(self, model: str, prompt_tokens: int, completion_tokens: int, pools: Iterable[str]) -> int:
        """The highest cost among the model's price and ``pools``': what to reserve before the pool is known."""
        return max(self.cost(model, prompt_tokens, completion_tokens, p) for p in ("", *pools))


@dataclass(frozen=True)
class Window:
    """The spend windows a reservation counts against: a UTC day and a UTC calendar month, with when their keys
    may expire and when each window ends (for ``retry-after``). Unix seconds."""

    day: int  # days since 1970-01-01 (UTC)
    month: int  # yyyymm
    day_end: float
    month_end: float

    @property
    def day_expire_at(self) -> int:
        return int(self.day_end) + 86_400  # a day's spend is kept a day after it, for late refunds

    @property
    def month_expire_at(self) -> int:
        return int(self.month_end) + 86_400


def window_at(now: float) -> Window:
    d = datetime.datetime.fromtimestamp(now, datetime.timezone.utc)
    day = int(now // 86_400)
    y, m = (d.year + 1, 1) if d.month == 12 else (d.year, d.month + 1)
    month_end = calendar.timegm((y, m, 1, 0, 0, 0))
    return Window(day=day, month=d.year * 100 + d.month, day_end=(day + 1) * 86_400.0, month_end=float(month_end))
