"""The app factory: `create_app(settings)`. Engines live in the lifespan, errors are mapped here."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from functools import partial

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from models.registry import Registry
from server.config.reload import ConfigReloader
from server.deployments.reconcile import Reconciler
from server.deployments.resume import to_restore
from server.api import admin_api, batches_api, conversations, deploy_api, embeddings, files_api, messages, openai_api, responses, scoring, status_api, stored_completions, tokens
from server.api.body_limit import BodySizeLimit
from server.api.error_bodies import error_body
from server.api.rate_limits import RateLimits
from server.api.request_id import RequestId
from server.api.background import BackgroundRuns
from server.api.completion_store import CompletionStore
from server.api.conversation_store import ConversationStore
from server.api.mirrors import Mirrors
from server.api.response_store import ResponseStore
from server.batches.files import FileStore
from server.batches.in_process import InProcess, caller_of
from server.batches.runner import BatchRunner
from server.batches.store import BatchStore
from server.observability.gpu_monitor import GpuMonitor, load_nvml
from server.observability.metrics import BatchCollector, Metrics, StateCollector
from server.config.settings import Settings
from server.lifecycle import Lifecycle
from server.engines.factory import build_engine
from models.errors import (
    BatonError,
    InvalidRequestError,
    MethodNotAllowedError,
    NotFoundError,
    UnsupportedParameterError,
)
from server.api.model_admin import ModelAdmin
from server.deployments.manager import DeploymentManager
from server.deployments.slot_lifecycle import EngineFactory

log = logging.getLogger(__name__)


def _batch_runner(settings: Settings, server: InProcess, keys: list, lifecycle: Lifecycle) -> BatchRunner:
    """Batches and their files under the home; their requests served by `server`, as the
    key that made each batch."""
    files = FileStore(settings.home / "batches.db", settings.home / "files", settings.max_file_bytes_per_key)
    return BatchRunner(BatchStore(settings.home / "batches.db"), files, settings.home / "batch-work", server, partial(caller_of, keys), lambda: lifecycle.is_shutting_down)


def create_app(settings: Settings, engine_factory: EngineFactory = build_engine, lifecycle: Lifecycle | None = None) -> FastAPI:
    lifecycle = lifecycle or Lifecycle()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        registry = Registry(settings.home)
        metrics = Metrics()
        manager = DeploymentManager(settings, registry, engine_factory, metrics)
        metrics.watch(StateCollector(lambda: manager.deployments))
        gpus = GpuMonitor(load_nvml(), settings.gpu_sample_interval_s, manager.engine_owners)
        metrics.watch(gpus)
        gpus.start()
        lifecycle.track(manager.num_in_flight)
        background_runs = BackgroundRuns()
        keys = settings.all_keys()
        state: dict = {}  # the lifespan state, filled below; batches' in-process requests get it too
        in_process = InProcess(app, state)  # batches' and mirrors' requests
        batch_runner = _batch_runner(settings, in_process, keys, lifecycle)
        mirrors = Mirrors(in_process)
        metrics.watch(BatchCollector(batch_runner.store.summary))

        saved = to_restore(registry.saved_deployments() if settings.restore_state else {}, settings.models, settings.config_file is not None)

        async def deploy_at_start() -> None:
            for spec in settings.models:
                deployment = await manager.deploy_spec(spec, saved.get(spec.name))
                log.info("serving %s (%s) from %s", spec.name, deployment.version, spec.path)
            await manager.restore(saved)

        try:
            started = await lifecycle.unless_shutting_down(deploy_at_start())
            if not started:
                log.info("start-up cut short by the shutdown")
            manager.start()
            reconciler = Reconciler(manager, registry)
            if settings.config_file is not None:
                reloader = ConfigReloader(settings, reconciler, manager.keep)
                reloader.reload_on_sighup()
                if settings.watch_config_s is not None:
                    reloader.watch(settings.watch_config_s)
                if started and saved:  # a rollout resumed where it was: the file goes on from there
                    manager.keep(asyncio.create_task(reloader.reload("start")))
            state.update({
                "settings": settings,
                "lifecycle": lifecycle,
                "keys": keys,
                "rate_limits": RateLimits(),
                "metrics": metrics,
                "gpus": gpus,
                "deployments": manager,
                "router": manager.router,
                "reconciler": reconciler,
                "model_admin": ModelAdmin(registry, manager.holders),
                "responses": ResponseStore(settings.home / "responses.db", settings.responses_ttl_s, settings.max_kept_bytes_per_key) if settings.store_responses else None,
                "conversations": ConversationStore(settings.home / "responses.db", settings.max_kept_bytes_per_key) if settings.store_responses else None,
                "completions": CompletionStore(settings.home / "responses.db", settings.responses_ttl_s, settings.max_kept_bytes_per_key) if settings.store_responses else None,
                "background_runs": background_runs,
                "files": batch_runner.files,
                "batches": batch_runner.store,
                "batch_runner": batch_runner,
                "mirrors": mirrors,
                "started_at": int(time.time()),
            })  # fmt: skip
            if started:
                batch_runner.resume_all()
            yield state
        finally:
            await batch_runner.stop_all()  # unfinished batches run on at the next start
            await background_runs.cancel_all()  # what the shutdown's drain left running
            await mirrors.close()
            await manager.stop_all()
            gpus.stop()

    app = FastAPI(title="baton", lifespan=lifespan)
    app.include_router(openai_api.router)
    app.include_router(stored_completions.router)
    app.include_router(responses.router)
    app.include_router(conversations.router)
    app.include_router(files_api.router)
    app.include_router(batches_api.router)
    app.include_router(messages.router)
    app.include_router(embeddings.router)
    app.include_router(scoring.router)
    app.include_router(tokens.router)
    app.include_router(status_api.router)
    app.include_router(admin_api.router)
    app.include_router(deploy_api.router)
    _map_errors(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes, max_bytes_by_path={"/v1/files": settings.max_file_bytes})
    app.add_middleware(RequestId)
    return app


def _map_errors(app: FastAPI) -> None:
    """Every error leaves as OpenAI-shaped JSON (Anthropic-shaped on its routes); nothing
    else reaches a client."""

    @app.exception_handler(BatonError)
    async def baton_error(request: Request, error: BatonError) -> Response:
        return _json(request, error)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request: Request, error: RequestValidationError) -> Response:
        return _json(request, _from_validation(error))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> Response:
        if isinstance(error.__cause__, BatonError):  # raised while FastAPI read the body
            return _json(request, error.__cause__)
        if error.status_code == 405:
            return _json(request, MethodNotAllowedError(f"Method {request.method} is not allowed on {request.url.path}."))
        if error.status_code == 404:
            return _json(request, NotFoundError(f"No route {request.method} {request.url.path}."))
        return _json(request, InvalidRequestError(str(error.detail)), status_code=error.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=error)
        return _json(request, BatonError("Internal server error; see the server log."))


def _from_validation(error: RequestValidationError) -> InvalidRequestError:
    """One error, named as the request wrote it. Rule: of several (one per union branch
    tried, say), the one deepest into what was sent: for an item of the wrong type, its `type`
    field, not "should be a valid string" from the union's string branch."""
    first = max(error.errors(), key=lambda e: len(_where(error.body, e)))
    param = ".".join(_where(error.body, first)) or None
    kind = first["type"]
    if kind == "json_invalid":
        return InvalidRequestError(f"The request body is not valid JSON: {first.get('ctx', {}).get('error', kind)}.", code="invalid_json")
    if kind == "extra_forbidden":
        return UnsupportedParameterError(f"Unrecognized request argument supplied: {param}. baton does not implement it.", param=param)
    if kind == "missing" and param is None:
        return InvalidRequestError("The request has no body; send a JSON object.", code="missing_body")
    if kind == "missing":
        return InvalidRequestError(f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter")
    where = f"'{param}'" if param else "the request body"
    return InvalidRequestError(f"Invalid value for {where}: {first['msg'].removeprefix('Value error, ')}.", param=param, code="invalid_value")


def _where(body, error: dict) -> list[str]:
    """The path in the body where `error` is. pydantic's `loc` also names the union branches it
    tried (`str`, `list[ContentPart]`, a tag): a step the body does not have is such a label,
    except a missing field's own name."""
    loc = list(error["loc"])
    if not loc or loc[0] != "body" or body is None:  # no body to read it against
        return [str(part) for part in loc if part != "body"]
    steps, value = [], body
    for part in loc[1:]:
        if isinstance(value, dict) and part in value or isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value):
            steps.append(str(part))
            value = value[part]
    if error["type"] == "missing" and len(loc) > 1:
        steps.append(str(loc[-1]))
    return steps


def _json(request: Request, error: BatonError, status_code: int | None = None) -> Response:
    """As ASCII JSON: a message may quote what a request sent, lone surrogates included,
    which UTF-8 cannot encode. OpenAI's shape, but on Anthropic's routes, Anthropic's."""
    headers = {"retry-after": str(error.retry_after_s)} if error.retry_after_s is not None else None
    status_code = status_code or error.status_code
    body = error_body(request.url.path, error, status_code)
    return Response(json.dumps(body), status_code=status_code, headers=headers, media_type="application/json")
