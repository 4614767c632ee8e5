"""What one /v1 request did: its metrics and its one JSON log line (never the prompt).

Rule: the request path only notes times and counts here; histograms are observed once, when
the request ends."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from server.deployments.health import Outcome
from server.observability.metrics import Metrics

log = logging.getLogger("baton.requests")


class Unobserved:
    """`--no-request-metrics`: the request path notes nothing (to measure what noting costs)."""

    num_prompt_tokens = 0

    def leased(self, *args) -> None: ...

    def prepared(self) -> None: ...

    def tokens(self, num_tokens: int, num_cached_prompt_tokens: int = 0) -> None: ...

    def finish(self, status: int) -> None: ...


class RequestObservation:
    def __init__(self, metrics: Metrics, request_id: str, deployment: str, charge_tokens: Callable[[int], None] = lambda _: None):
        """`charge_tokens`: the key's token rate, charged when the request ends."""
        self._metrics = metrics
        self._charge_tokens = charge_tokens
        self._on_outcome: Callable[[Outcome], None] = lambda _: None
        self.request_id = request_id
        self.deployment = deployment
        self.version = "-"
        self._started = time.perf_counter()
        self._leased_at: float | None = None
        self._first_token_at: float | None = None
        self.num_prompt_tokens = 0
        self.num_cached_prompt_tokens = 0  # of them, those the engine's prefix cache held
        self.num_completion_tokens = 0
        self._is_finished = False

    def leased(self, deployment: str, version: str, on_outcome: Callable[[Outcome], None]) -> None:
        """The request got its lease (maybe on a fallback: `deployment` is the one serving);
        its outcome will feed `on_outcome` (the deployment's health window)."""
        self._leased_at = time.perf_counter()
        self._metrics.queue_seconds.labels(self.deployment).observe(self._leased_at - self._started)
        self.deployment, self.version, self._on_outcome = deployment, version, on_outcome

    def prepared(self) -> None:
        """Its prompts are read (chat template, tokenizer, limits): what is left is the engine's."""
        if self._leased_at is not None:
            self._metrics.prepare_seconds.labels(self.deployment).observe(time.perf_counter() - self._leased_at)

    def tokens(self, num_tokens: int, num_cached_prompt_tokens: int = 0) -> None:
        """Tokens generated; and, with a prompt's first, those of the prompt the prefix cache held."""
        if num_tokens and self._first_token_at is None:
            self._first_token_at = time.perf_counter()
        self.num_completion_tokens += num_tokens
        self.num_cached_prompt_tokens += num_cached_prompt_tokens

    def finish(self, status: int) -> None:
        """Once per request, however it ended."""
        if self._is_finished:
            return
        self._is_finished = True
        duration = time.perf_counter() - self._started
        labels = (self.deployment, self.version)
        self._metrics.requests.labels(*labels, str(status)).inc()
        self._metrics.request_seconds.labels(*labels).observe(duration)
        self._metrics.prompt_tokens.labels(*labels).inc(self.num_prompt_tokens)
        self._metrics.cached_prompt_tokens.labels(*labels).inc(self.num_cached_prompt_tokens)
        self._metrics.completion_tokens.labels(*labels).inc(self.num_completion_tokens)
        self._charge_tokens(self.num_prompt_tokens + self.num_completion_tokens)
        ttft = self._first_token_at - self._started if self._first_token_at is not None else None
        tokens_per_s = None
        if ttft is not None:
            self._metrics.ttft_seconds.labels(*labels).observe(ttft)
            if self.num_completion_tokens > 1 and duration > ttft:
                self._metrics.tpot_seconds.labels(*labels).observe((duration - ttft) / (self.num_completion_tokens - 1))
                tokens_per_s = (self.num_completion_tokens - 1) / (duration - ttft)
        self._on_outcome(Outcome(time.monotonic(), status >= 500, ttft, tokens_per_s))
        log.info(
            {
                "event": "request",
                "request_id": self.request_id,
                "deployment": self.deployment,
                "version": self.version,
                "status": status,
                "prompt_tokens": self.num_prompt_tokens,
                "cached_prompt_tokens": self.num_cached_prompt_tokens,
                "completion_tokens": self.num_completion_tokens,
                "ttft_s": round(ttft, 4) if ttft is not None else None,
                "duration_s": round(duration, 4),
            }
        )
