"""The router: where a request's `model` sends it, and the lease it serves under. It reads
the manager's deployments and changes none of them (an on-demand one is asked to load)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from models.errors import InvalidRequestError, ModelNotFoundError, NotFoundError
from models.registry import Registry
from server.deployments.deployment import Deployment
from server.deployments.slot import Lease


@dataclass(frozen=True)
class Route:
    """Where a request goes: a deployment, and the version it pins (None: the deployment's
    own choice, active or canary by weight, the same for every request of one `user`)."""

    deployment: str
    version: str | None = None
    user: str | None = None
    priority: int = 0  # its place in the deployment's admission queue: lower is sooner


class Router:
    def __init__(self, deployments: Callable[[], dict[str, Deployment]], registry: Registry, start_load: Callable[[Deployment], object]):
        self._deployments = deployments
        self._registry = registry
        self._start_load = start_load

    def route(self, model: str, user: str | None = None) -> Route:
        """Where a request's `model` (from `user`) sends it. A deployment's name pins nothing;
        a registry ref (`chat@3`, `chat@prod`) pins that version, on a deployment whose active
        or canary slot serves it (or that loads it next on demand), the one named like the
        model first."""
        if "@" not in model:
            return Route(self.served(model).name, user=user)
        version = self._ref_of(model)
        deployments = self._deployments()
        serving = [d for d in deployments.values() if version in d.pinnable_versions]
        if not serving:
            served = ", ".join(sorted(set().union(*(d.pinnable_versions for d in deployments.values())))) or "none"
            raise ModelNotFoundError(f"The model '{model}' ({version}) is not served now. Versions served: {served}.", param="model")
        named_like_it = deployments.get(version.partition("@")[0])
        return Route((named_like_it if named_like_it in serving else serving[0]).name, version)

    async def lease(self, route: Route) -> Lease:
        """A place in the deployment's admission queue, then a lease on the slot that serves
        it (the pinned version's, if any); the place is given back with the lease. A
        deployment that is failed or breaching its objectives sends an unpinned request to
        its first healthy fallback instead."""
        deployment = self.served(route.deployment)
        fallback = self._healthy_fallback(deployment) if deployment.needs_fallback and route.version is None else None
        if fallback is not None:
            lease = await self._lease_on(fallback, user=route.user, priority=route.priority)
            lease.fallback_from = deployment.name
            return lease
        return await self._lease_on(deployment, route.version, route.user, route.priority)

    async def lease_tokenizer(self, route: Route) -> Lease:
        """A lease on the slot whose tokenizer a request reads (counting tokens), outside the
        admission queue: it generates nothing, so it waits behind no generation; an on-demand
        deployment still loads for it."""
        return await self._slot_lease(self.served(route.deployment), route.version, route.user)

    def served(self, model: str) -> Deployment:
        """The deployment a request's `model` names, in OpenAI's words where there is none."""
        deployments = self._deployments()
        if (deployment := deployments.get(model)) is None:
            raise ModelNotFoundError(f"The model '{model}' does not exist. Known models: {names_of(deployments)}.", param="model")
        return deployment

    def _ref_of(self, model: str) -> str:
        """`chat@3` as it is; an alias (`chat@prod`) resolved in the registry."""
        name, _, selector = model.partition("@")
        if selector.isdigit():
            return f"{name}@{int(selector)}"
        try:
            return self._registry.resolve(model).ref
        except (NotFoundError, InvalidRequestError) as error:
            raise ModelNotFoundError(f"The model '{model}' does not exist: {error}", param="model") from error

    def _healthy_fallback(self, deployment: Deployment) -> Deployment | None:
        for name in deployment.policy.fallbacks:
            candidate = self._deployments().get(name)
            if candidate is not None and candidate.active is not None and not (candidate.is_failed or candidate.is_breaching):
                return candidate
        return None

    async def _lease_on(self, deployment: Deployment, version: str | None = None, user: str | None = None, priority: int = 0) -> Lease:
        await deployment.admission.enter(priority)
        try:
            lease = await self._slot_lease(deployment, version, user)
        except BaseException:
            deployment.admission.leave()
            raise
        lease.on_release(deployment.admission.leave)
        return lease

    async def _slot_lease(self, deployment: Deployment, version: str | None, user: str | None) -> Lease:
        if deployment.needs_load:
            self._start_load(deployment)
        lease = await deployment.lease(version, user)
        lease.deployment = deployment.name
        return lease


def names_of(deployments: dict[str, Deployment]) -> str:
    return ", ".join(sorted(deployments)) or "none"
