"""When to try again after an engine died: a pure backoff, tested alone."""

from __future__ import annotations

FIRST_DELAY_S = 1.0
MAX_DELAY_S = 60.0


def restart_delay_s(num_failed_restarts: int) -> float:
    """Seconds to wait before restart attempt `num_failed_restarts + 1`: none before the
    first, then 1, 2, 4 ... up to a minute, for as long as the engine keeps failing."""
    if num_failed_restarts < 0:
        raise ValueError("num_failed_restarts cannot be negative")
    if num_failed_restarts == 0:
        return 0.0
    return min(MAX_DELAY_S, FIRST_DELAY_S * 2 ** (num_failed_restarts - 1))
