"""kdsearch's one backoff policy, on tenacity: exponential, doubling from a first delay, capped.

``backoff_delay`` gives the delay after a number of consecutive failures where the wait is stored rather than slept
(a study's preparation held back until ``retry_at``, a webhook's ``next_attempt_at``) or slept by a loop that must
stay interruptible (a worker backing off after infrastructure faults waits on its stop event). In-process retries
of a call use ``tenacity`` directly with ``exponential_wait`` (``storage.retry_operational``).
"""

from __future__ import annotations

import tenacity


def exponential_wait(first_delay_s: float, max_delay_s: float) -> tenacity.wait.wait_base:
    """``first_delay_s`` after the first failure, doubling after each one, never more than ``max_delay_s``."""
    return tenacity.wait_exponential(multiplier=first_delay_s, exp_base=2, min=0, max=max_delay_s)


def backoff_delay(first_delay_s: float, failures: int, max_delay_s: float = 300.0) -> float:
    """Seconds to hold back after ``failures`` (1 or more) consecutive failures: ``first_delay_s * 2**(failures-1)``,
    at most ``max_delay_s``."""
    state = tenacity.RetryCallState(retry_object=tenacity.Retrying(), fn=None, args=(), kwargs={})
    state.attempt_number = max(failures, 1)
    return float(exponential_wait(first_delay_s, max_delay_s)(state))
