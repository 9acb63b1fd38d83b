"""When the agent checks next: the regular interval with jitter, and backoff after transient
failures."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime

from apscheduler.triggers.interval import IntervalTrigger

from updateagent.errors import UpdateAgentError


@dataclass(frozen=True)
class Schedule:
    interval: float = 45 * 60.0
    jitter: float = 0.10  # fraction of the interval, both ways
    retry_initial: float = 5 * 60.0
    max_backoff: float = 4 * 3600.0

    def next_check(self, now: datetime) -> datetime:
        """``interval`` ± ``jitter`` after ``now``. apscheduler's jitter only adds, so start low."""
        low = self.interval * (1 - self.jitter)
        spread = self.interval * 2 * self.jitter
        trigger = IntervalTrigger(seconds=low, jitter=spread or None, start_date=now, timezone=now.tzinfo)
        fire = trigger.get_next_fire_time(now, now)
        assert fire is not None
        return fire

    def retry_after(self, failures: int) -> float:
        """Exponential backoff after ``failures`` consecutive transient failures (>= 1)."""
        # Cap the exponent: after ~1025 failures 2 ** n no longer fits a float (OverflowError).
        base = min(self.retry_initial * 2.0 ** min(failures - 1, 64), self.max_backoff)
        return min(base * random.uniform(1 - self.jitter, 1 + self.jitter), self.max_backoff)


def is_transient(exc: BaseException) -> bool:
    """Worth retrying with backoff: what the code that raised ``exc`` said (``UpdateAgentError.transient``)."""
    return isinstance(exc, UpdateAgentError) and exc.transient
