"""The health watch: every second, each deployment's window against its objectives, its
golden prompts when due, and a canary under analysis against the active version; on a
breach, the alert and the policy's action (or the canary's abort). The verdicts are pure
(health.py); this is the loop and its side effects."""

from __future__ import annotations

import asyncio
import functools
import logging
import re
import time
import uuid

import httpx

from models.catalog import Change
from models.errors import BatonError
from server.config.settings import Settings
from server.deployments.deployment import Deployment
from server.deployments.health import Breach, GoldenPrompt, Slo, breaches, canary_verdict, slo_from_baseline
from server.deployments.slot import Slot
from server.engines.base import GenerationRequest, SamplingParams, can_generate
from server.observability.metrics import Metrics

log = logging.getLogger(__name__)


class HealthWatch:
    def __init__(self, manager, metrics: Metrics, settings: Settings):
        """`manager`: the DeploymentManager (its deployments, `rollback`, `keep`)."""
        self._manager = manager
        self._metrics = metrics
        self._settings = settings
        self._golden_due: dict[str, float] = {}
        self._deciding: set[str] = set()  # deployments whose canary verdict is being acted on

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self._settings.idle_check_s)
            for deployment in self._manager.deployments:
                if deployment.active is None or deployment.swap_lock.locked():
                    continue
                try:
                    await self._check(deployment)
                except Exception:  # one failed check must not end the watch, for this deployment or the others
                    log.exception("could not check the health of deployment %s", deployment.name)

    async def _check(self, deployment: Deployment) -> None:
        await self._check_slo(deployment)
        if deployment.judged_canary is not None and deployment.name not in self._deciding:
            self._judge_canary(deployment)
        if deployment.policy.golden_prompts and time.monotonic() >= self._golden_due.get(deployment.name, 0.0):
            self._golden_due[deployment.name] = time.monotonic() + deployment.policy.golden_interval_s
            self._manager.keep(asyncio.ensure_future(self._check_golden(deployment)))

    async def _check_slo(self, deployment: Deployment) -> None:
        slo = deployment.policy.slo or self._baseline(deployment)
        found = breaches(deployment.window.stats(time.monotonic()), slo) if slo else []
        if found and "slo" not in deployment.breaching:
            await self._on_breach(deployment, found, "slo")
        elif not found and "slo" in deployment.breaching:
            self._recovered(deployment, "slo")  # met again, or too quiet to say: traffic comes back

    def _judge_canary(self, deployment: Deployment) -> None:
        """Abort a canary that breaches; move one that served its time at its weight within
        objectives to its next step, or promote it (health.canary_verdict). One verdict is
        acted on at a time."""
        now, canary = time.monotonic(), deployment.canary
        analysis, weight = canary.analysis, canary.weight
        verdict, found = canary_verdict(canary.window.stats(now), deployment.window.stats(now), analysis, deployment.policy.slo, now - canary.since)
        if verdict == "abort":
            self._abort_canary(deployment, found)
        elif verdict == "advance":
            reason = f"canary analysis: within objectives for {analysis.promote_after_s:g} s at {weight}%"
            next_weight = analysis.next_weight(weight)
            self._start_acting(deployment, self._manager.promote_canary if next_weight is None else functools.partial(self._manager.step_canary, weight=next_weight), reason)

    def _abort_canary(self, deployment: Deployment, found: list[Breach]) -> None:
        self._alert(deployment, deployment.canary.version, found, "abort_canary")
        self._start_acting(deployment, self._manager.abort_canary, "canary analysis: " + "; ".join(b.text for b in found))

    def _start_acting(self, deployment: Deployment, act, reason: str) -> None:
        self._deciding.add(deployment.name)
        self._manager.keep(asyncio.ensure_future(self._act(act, deployment.name, reason)))

    async def _act(self, act, name: str, reason: str) -> None:
        """A canary's abort, step or promotion, as baton: its record says why, or a log line why not."""
        try:
            await act(name, Change("baton", reason))
        except BatonError as error:
            log.error("the canary analysis of %s could not act: %s", name, error)
        finally:
            self._deciding.discard(name)

    def _baseline(self, deployment: Deployment) -> Slo | None:
        """The version's own objectives, taken once it has served the baseline's `after_s`."""
        rule = deployment.policy.baseline
        if rule is None or deployment.baseline is not None:
            return deployment.baseline
        if time.monotonic() - deployment.serving_since >= rule.after_s:
            deployment.baseline = slo_from_baseline(deployment.window.stats(time.monotonic()), rule)
            if deployment.baseline is not None:
                log.info({"event": "baseline", "deployment": deployment.name, "version": deployment.version, "slo": deployment.baseline.model_dump()})
        return deployment.baseline

    async def _check_golden(self, deployment: Deployment) -> None:
        """The golden prompts on the active version (a wrong answer is a breach), then on a
        canary under analysis (a wrong answer aborts it)."""
        prompts = deployment.policy.golden_prompts
        miss = await self._golden_miss(deployment.active, prompts)
        if miss and "golden" not in deployment.breaching:
            await self._on_breach(deployment, [miss], "golden")
        elif not miss and "golden" in deployment.breaching:
            self._recovered(deployment, "golden")
        canary = deployment.judged_canary
        if canary is None:
            return
        miss = await self._golden_miss(canary.slot, prompts)
        if miss and deployment.canary is canary and deployment.name not in self._deciding:  # still judged: not promoted or aborted meanwhile
            self._abort_canary(deployment, [miss])

    async def _golden_miss(self, slot: Slot, prompts: list[GoldenPrompt]) -> Breach | None:
        """The first golden prompt the slot answers wrongly (greedily), if any. An engine that
        only embeds writes no answer to judge: its golden prompts are not asked."""
        if not can_generate(slot.engine):
            return None
        for index, golden in enumerate(prompts):
            try:
                answer = await self._answer(slot, golden.prompt)
            except Exception as error:  # the engine failing counts as a wrong answer
                answer = f"(failed: {error})"
            if not re.search(golden.expect, answer):
                return Breach("golden_prompt", f"golden prompt {index} answered {answer[:80]!r}, which does not match {golden.expect!r}")
        return None

    def _recovered(self, deployment: Deployment, source: str) -> None:
        deployment.breaching.discard(source)
        log.info({"event": "recovered", "deployment": deployment.name, "version": deployment.version, "source": source})

    async def _on_breach(self, deployment: Deployment, found: list[Breach], source: str) -> None:
        """Alert (log line, metric, webhook), then act as the policy says. `source`: which
        check found it (slo, golden); each clears on its own."""
        action = deployment.policy.on_breach
        if action == "rollback" and (deployment.previous_version is None or deployment.swap_lock.locked()):
            action = "alert"  # nothing to roll back to, or a swap is under way already
        self._alert(deployment, deployment.version, found, action)
        deployment.breaching.add(source)
        if action == "rollback":
            reason = "degradation: " + "; ".join(b.text for b in found)
            self._manager.keep(asyncio.ensure_future(self._roll_back(deployment.name, reason)))

    def _alert(self, deployment: Deployment, version: str, found: list[Breach], action: str) -> None:
        """A log line, a metric per breach, and the policy's webhook if it has one."""
        alert = {"event": "degradation", "deployment": deployment.name, "version": version, "breaches": [b.text for b in found], "action": action}
        log.error(alert)
        for breach in found:
            self._metrics.degradations.labels(deployment.name, breach.kind, action).inc()
        if deployment.policy.webhook_url:
            self._manager.keep(asyncio.ensure_future(_post_alert(deployment.policy.webhook_url, alert)))

    async def _roll_back(self, name: str, reason: str) -> None:
        try:
            await self._manager.rollback(name, Change("baton", reason))
        except BatonError as error:  # the version serves on; its swap record (if any) says why too
            log.error("automatic rollback of %s failed: %s", name, error)

    async def _answer(self, slot: Slot, prompt: str, max_tokens: int = 64) -> str:
        """A greedy chat answer straight from a slot's engine."""
        prompt_ids = slot.engine.tokenize_chat([{"role": "user", "content": prompt}])
        request = GenerationRequest("golden-" + uuid.uuid4().hex, prompt_ids, SamplingParams(max_tokens, 0.0))
        async with asyncio.timeout(self._settings.verify_timeout_s):
            return "".join([chunk.text async for chunk in slot.engine.generate(request)])


async def _post_alert(url: str, alert: dict) -> None:
    """The operator's webhook: best effort, never in a request's way."""
    try:
        async with httpx.AsyncClient(timeout=5) as client:
            (await client.post(url, json=alert)).raise_for_status()
    except httpx.HTTPError as error:
        log.warning("could not post the alert to %s: %s", url, error)
