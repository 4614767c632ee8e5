"""Is a deployment degrading? Outcomes of its recent requests in a rolling window, and a
pure verdict against its service-level objectives (no I/O: every rule is a unit test); the
same for a canary, against the active version.

Rule: no verdict on too little traffic (`min_requests`), so a quiet deployment never breaches
and one that lost its traffic to a fallback is tried again once its window empties.
"""

from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from models.errors import InvalidRequestError
from models.names import Text

WINDOW_S = 60.0


class Slo(BaseModel):
    """What a deployment promises; any field left unset is not checked."""

    model_config = ConfigDict(extra="forbid")

    max_error_rate: float | None = Field(None, ge=0, le=1, description="share of 5xx answers")
    max_ttft_p95_s: float | None = Field(None, gt=0)
    min_tokens_per_s: float | None = Field(None, gt=0, description="median per request, after its first token")
    min_requests: int = Field(10, ge=1, description="fewer in the window: no verdict")


class Margins(BaseModel):
    """Objectives taken from measured traffic, with room to move."""

    model_config = ConfigDict(extra="forbid")

    ttft_factor: float = Field(2.0, gt=1, description="breach: TTFT p95 above this times the measured one")
    tokens_per_s_factor: float = Field(0.5, gt=0, lt=1, description="breach: tokens/s below this times the measured")
    error_rate_margin: float = Field(0.05, ge=0, le=1, description="breach: error rate above the measured one plus this")
    min_requests: int = Field(10, ge=1)


class Baseline(Margins):
    """Objectives learnt from the version itself: its last minute of traffic once it has
    served `after_s`, with room to move; used where no explicit `slo` is set."""

    after_s: float = Field(300.0, gt=0, description="how long a new version serves before its baseline is taken")


CanaryWeight = Annotated[int, Field(ge=1, le=99)]  # a canary's share of new requests, in percent: neither none nor all
CanaryStartWeight = Annotated[int, Field(ge=0, le=99)]  # as a canary starts: 0 with a mirror (copies of requests only)
MirrorShare = Annotated[int, Field(ge=0, le=100)]  # the active version's requests a canary gets copies of, in percent


def check_canary_share(weight: int, mirror: int) -> None:
    """Rule: a canary serves a share of requests (1 to 99 percent), gets copies of a share
    of them (its mirror, 0 to 100 percent), or both; never neither."""
    if not 0 <= weight <= 99:
        raise InvalidRequestError("A canary weight is a percentage between 0 and 99 (0: with a mirror only).", param="weight")
    if not 0 <= mirror <= 100:
        raise InvalidRequestError("A canary's mirror is a percentage between 0 and 100.", param="mirror")
    if weight == 0 and mirror == 0:
        raise InvalidRequestError("A canary at weight 0 serves nothing: give it a mirror (a share of requests copied to it) or a weight.", param="weight")


class CanaryAnalysis(Margins):
    """A canary judged by baton: against the deployment's `slo` if it has one, else against
    the active version's last minute (within the margins), both windows holding at least
    `min_requests`. A breach aborts it; with `promote_after_s`, one that served that long
    at its weight with no breach moves on: to the next of `steps`, then to promotion."""

    promote_after_s: float | None = Field(None, gt=0, description="time within objectives at each weight before moving on; None: an operator promotes")
    steps: list[CanaryWeight] = Field(default_factory=list, max_length=20, description="weights to move through before promotion, increasing")

    @field_validator("steps")
    @classmethod
    def _increasing(cls, steps: list[int]) -> list[int]:
        if steps != sorted(set(steps)):
            raise ValueError("steps are increasing weights between 1 and 99")
        return steps

    def check_steps_above(self, weight: int) -> None:
        """A canary starting at `weight` moves up through its steps."""
        if self.steps and self.steps[0] <= weight:
            raise InvalidRequestError(f"The canary's steps go up from its weight ({weight}%); {self.steps[0]}% is not above it.", param="analysis.steps")

    def next_weight(self, weight: int) -> int | None:
        """Where a canary at `weight` that passed its stage goes: the next step above it, or
        None (promotion)."""
        return next((step for step in self.steps if step > weight), None)


class GoldenPrompt(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt: Text = Field(min_length=1)
    expect: str = Field(min_length=1, description="a regular expression the greedy answer must match")


class HealthPolicy(BaseModel):
    """Per deployment: what to watch and what to do when it breaches."""

    model_config = ConfigDict(extra="forbid")

    slo: Slo | None = None
    baseline: Baseline | None = Field(None, description="objectives from the version's own first minutes, where slo is not set")
    golden_prompts: list[GoldenPrompt] = Field(default_factory=list)
    golden_interval_s: float = Field(60.0, gt=0)
    on_breach: Literal["alert", "rollback", "fallback"] = "alert"
    fallbacks: list[str] = Field(default_factory=list, description="deployments that serve while this one is failed or breaching")
    webhook_url: str | None = Field(None, pattern=r"^https?://", description="POSTed a JSON alert on each breach")

    def check_for(self, deployment: str) -> HealthPolicy:
        """A deployment cannot be its own fallback: while it fails, it would serve itself."""
        if deployment in self.fallbacks:
            raise InvalidRequestError(f"Deployment {deployment} names itself among its fallbacks.", param="health.fallbacks")
        return self


@dataclass(frozen=True)
class Outcome:
    at: float
    is_error: bool
    ttft_s: float | None
    tokens_per_s: float | None


@dataclass(frozen=True)
class WindowStats:
    num_requests: int
    error_rate: float
    ttft_p95_s: float | None
    tokens_per_s: float | None


class Window:
    def __init__(self, seconds: float = WINDOW_S):
        self._seconds = seconds
        self._outcomes: deque[Outcome] = deque()

    def add(self, outcome: Outcome) -> None:
        self._outcomes.append(outcome)

    def clear(self) -> None:
        self._outcomes.clear()

    def stats(self, now: float) -> WindowStats:
        while self._outcomes and self._outcomes[0].at < now - self._seconds:
            self._outcomes.popleft()
        outcomes = list(self._outcomes)
        ttfts = sorted(o.ttft_s for o in outcomes if o.ttft_s is not None)
        rates = [o.tokens_per_s for o in outcomes if o.tokens_per_s is not None]
        return WindowStats(
            num_requests=len(outcomes),
            error_rate=sum(o.is_error for o in outcomes) / len(outcomes) if outcomes else 0.0,
            ttft_p95_s=ttfts[min(len(ttfts) - 1, round(0.95 * (len(ttfts) - 1)))] if ttfts else None,
            tokens_per_s=statistics.median(rates) if rates else None,
        )


def slo_from_baseline(stats: WindowStats, rule: Margins) -> Slo | None:
    """The objectives a version's own early traffic sets; None on too little of it."""
    if stats.num_requests < rule.min_requests:
        return None
    return Slo(
        max_error_rate=min(1.0, stats.error_rate + rule.error_rate_margin),
        max_ttft_p95_s=stats.ttft_p95_s * rule.ttft_factor if stats.ttft_p95_s else None,
        min_tokens_per_s=stats.tokens_per_s * rule.tokens_per_s_factor if stats.tokens_per_s else None,
        min_requests=rule.min_requests,
    )


@dataclass(frozen=True)
class Breach:
    kind: str  # error_rate, ttft, tokens_per_s, golden_prompt: a bounded metric label
    text: str


def breaches(stats: WindowStats, slo: Slo) -> list[Breach]:
    """Which objectives the window misses; empty when it meets them all or when it holds
    too few requests to say."""
    if stats.num_requests < slo.min_requests:
        return []
    found = []
    if slo.max_error_rate is not None and stats.error_rate > slo.max_error_rate:
        found.append(Breach("error_rate", f"error rate {stats.error_rate:.1%} above {slo.max_error_rate:.1%}"))
    if slo.max_ttft_p95_s is not None and stats.ttft_p95_s is not None and stats.ttft_p95_s > slo.max_ttft_p95_s:
        found.append(Breach("ttft", f"TTFT p95 {stats.ttft_p95_s:.3f} s above {slo.max_ttft_p95_s:g} s"))
    if slo.min_tokens_per_s is not None and stats.tokens_per_s is not None and stats.tokens_per_s < slo.min_tokens_per_s:
        found.append(Breach("tokens_per_s", f"{stats.tokens_per_s:.1f} tokens/s below {slo.min_tokens_per_s:g}"))
    return found


def canary_verdict(canary: WindowStats, active: WindowStats, analysis: CanaryAnalysis, slo: Slo | None, served_s: float) -> tuple[str, list[Breach]]:
    """"abort" (with the breaches), "advance" (it served `promote_after_s` at its weight) or
    "wait". Rule: a canary is judged only when there is enough to judge by (its window, and
    the active version's where no `slo` is set); it never advances on a verdict that could
    not be made."""
    objectives = slo or slo_from_baseline(active, analysis)
    if objectives is None or canary.num_requests < max(objectives.min_requests, analysis.min_requests):
        return "wait", []
    if found := breaches(canary, objectives):
        return "abort", found
    if analysis.promote_after_s is not None and served_s >= analysis.promote_after_s:
        return "advance", []
    return "wait", []
