"""The `baton` command line."""

from __future__ import annotations

import argparse
import os
import sys
from functools import partial
from pathlib import Path

import uvicorn
from pydantic import ValidationError

from models.registry import Registry
from server.cli import deploy as deploy_cli, models as models_cli
from server.cli.models import engine_option_pairs
from server.auth.addresses import is_loopback
from server.config.settings import ModelSpec, Settings, default_home
from server.config.file import check_options, environment_overrides, load_config
from server.observability import logs
from server.auth.keys import load_key_file
from models.errors import BatonError, ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except BatonError as error:
        print(f"baton: error: {error.message}", file=sys.stderr)
        return 1
    except ValidationError as error:
        for problem in error.errors():
            where = ".".join(str(part) for part in problem["loc"])
            message = problem["msg"].removeprefix("Value error, ")
            print(f"baton: error: {where + ': ' if where else ''}{message}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="baton", description="Serve open-weight models behind an OpenAI-compatible API.")
    parser.add_argument("--home", type=Path, default=None, help=f"baton's data folder (default: $BATON_HOME or {default_home()})")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="serve models from the registry (the demo model when --model is not given)")
    serve.add_argument("--config", type=Path, default=None, help="a YAML config file: server settings and deployments (other flags but --log-* are then ignored); SIGHUP reloads it")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--model", action="append", help="a registry ref (chat, chat@2, chat@prod) or a local folder; repeatable")
    serve.add_argument("--name", help="the name clients send as `model`, when serving one model")
    serve.add_argument("--engine", default=None, choices=["auto", "vllm", "transformers"], help="default: the version's, else auto")
    serve.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"], help="default: the version's, else auto")
    serve.add_argument("--max-batch-size", type=int, default=None, help="generations decoded together (default: the version's, else 16)")
    serve.add_argument("--max-model-len", type=int, default=None, help="cap the context length")
    serve.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE", help="any other engine option for the served model (cuda_graphs=false); values are JSON; repeatable")
    serve.add_argument("--allow-pickle", action="store_true", help="allow .bin/.pt weights in a local folder (they can run code)")
    serve.add_argument("--api-key", default=os.environ.get("BATON_API_KEY"), help="require this bearer key on /v1 (default: $BATON_API_KEY)")
    serve.add_argument("--no-auth", action="store_true", help="allow serving /v1 without an API key beyond loopback")
    serve.add_argument("--admin-key", default=os.environ.get("BATON_ADMIN_KEY"), help="require this key on /admin; unset, /admin answers loopback only")
    serve.add_argument("--keys-file", type=Path, default=None, help="a JSON list of keys: name, key_env or key_sha256, scopes, deployments (see the README)")
    serve.add_argument("--import-root", type=Path, action="append", default=[], help="a folder the admin API may import from; repeatable")
    serve.add_argument("--drain-timeout", type=float, default=30.0, help="seconds a swapped-out version may finish its requests")
    serve.add_argument("--max-waiting", type=int, default=64, help="requests held per deployment during a replace swap")
    serve.add_argument("--max-wait", type=float, default=120.0, help="seconds a held request waits before a 503")
    serve.add_argument("--memory-budget-gb", type=float, default=None, help="model memory budget (default: 70%% of RAM)")
    serve.add_argument("--no-restore", action="store_true", help="start from these flags alone, not from what the last run served")
    serve.add_argument("--no-standby", action="store_true", help="stop swapped-out versions instead of keeping them loaded")
    serve.add_argument("--standby-host-budget-gb", type=float, default=None, help="host memory for versions asleep on standby (default: half of RAM)")
    serve.add_argument("--gpu-headroom-gib", type=float, default=2.0, help="GPU memory left free when a vLLM engine's share is planned")
    serve.add_argument("--gpu-room-for-blue-green", action="store_true", help="plan each vLLM engine at half the GPU, so the next version loads beside it")
    serve.add_argument("--max-prompt-tokens", type=int, default=None, help="the longest prompt accepted, in tokens")
    serve.add_argument("--max-completion-tokens", type=int, default=None, help="the most tokens a choice may generate (also the default)")
    serve.add_argument("--max-running-per-deployment", type=int, default=None, help="requests one deployment runs at once; more wait in its queue")
    serve.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds in-flight requests may finish after SIGTERM (a second SIGTERM exits at once)")
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--log-format", default="text", choices=["text", "json"], help="json: every log line a JSON object")
    serve.add_argument("--no-request-metrics", action="store_true", help="note nothing per request (benchmarks/metrics_overhead.py compares)")
    serve.add_argument("--no-store-responses", action="store_true", help="keep no Responses API answers, conversations or stored chat completions (previous_response_id, conversation, store: true and GET /v1/responses/ID then 400 and 404)")
    serve.add_argument("--metrics-need-key", action="store_true", help="/metrics needs a key with the metrics scope (default: open)")
    serve.set_defaults(run=_serve)

    demo = commands.add_parser("demo", help="import the bundled demo model into the registry (once) and print it")
    demo.set_defaults(run=_demo)
    models_cli.add_commands(commands, _home)
    deploy_cli.add_commands(commands)
    return parser


def _home(args) -> Path:
    return args.home or Path(os.environ.get("BATON_HOME") or default_home())


def _serve(args) -> int:
    from models.demo import ensure_demo_model

    keys = load_key_file(args.keys_file) if args.keys_file else []
    has_inference_key = args.api_key or any("inference" in k.scopes for k in keys)
    if not (has_inference_key or args.no_auth or is_loopback(args.host)):
        raise ConfigError(f"Listening on {args.host} would serve anyone unauthenticated: set --api-key (or BATON_API_KEY) or --keys-file, or pass --no-auth.")
    if args.config is not None:
        return _run_server(_settings_from_file(args), args)
    home = _home(args)
    registry = Registry(home)
    refs = args.model or [ensure_demo_model(registry).model]
    if args.name and len(refs) > 1:
        raise ConfigError("--name names one model; serve several under their registry names instead.")
    specs = [_model_spec(registry, ref, args) for ref in refs]
    settings = Settings(
        host=args.host,
        port=args.port,
        home=home,
        models=specs,
        api_key=args.api_key,
        admin_key=args.admin_key,
        keys=keys,
        metrics_need_key=args.metrics_need_key,
        request_metrics=not args.no_request_metrics,
        store_responses=not args.no_store_responses,
        max_prompt_tokens=args.max_prompt_tokens,
        max_completion_tokens=args.max_completion_tokens,
        max_running_per_deployment=args.max_running_per_deployment,
        import_roots=args.import_root,
        drain_timeout_s=args.drain_timeout,
        max_waiting=args.max_waiting,
        max_wait_s=args.max_wait,
        keep_standby=not args.no_standby,
        restore_state=not args.no_restore,
        gpu_headroom_gib=args.gpu_headroom_gib,
        gpu_room_for_blue_green=args.gpu_room_for_blue_green,
        **({"memory_budget_bytes": int(args.memory_budget_gb * 1e9)} if args.memory_budget_gb else {}),
        **({"standby_host_budget_bytes": int(args.standby_host_budget_gb * 1e9)} if args.standby_host_budget_gb is not None else {}),
    )
    return _run_server(settings, args)


def _settings_from_file(args) -> Settings:
    """Settings from `--config`: the file's server section, its keys read from the
    environment, and its deployments as registry versions to serve."""
    config = load_config(args.config)
    server = {"home": _home(args), **config.server_settings(), **environment_overrides()}
    registry = Registry(Path(server["home"]))
    specs = []
    for name, wanted in config.deployments.items():
        version = registry.resolve_for_serving(wanted.model)
        specs.append(ModelSpec(name=name, path=version.path, version=version.ref, on_demand=wanted.on_demand, idle_ttl_s=wanted.idle_ttl_s, smoke_prompts=wanted.smoke_prompts, health=wanted.health, engine_options=wanted.engine_options, rolls_out=wanted.canary is not None))
    settings = Settings(**server, **config.secrets(), models=specs, config_file=args.config.resolve())
    has_inference_key = settings.api_key or any("inference" in k.scopes for k in settings.keys)
    if not (has_inference_key or is_loopback(settings.host)):
        raise ConfigError(f"Listening on {settings.host} would serve anyone unauthenticated: set api_key_env or keys_file in {args.config}.")
    return settings


def _run_server(settings: Settings, args) -> int:
    logs.configure(args.log_level, args.log_format)
    from server.app import create_app  # torch and transformers: seconds to import, so after the checks
    from server.engines.factory import build_engine, kill_engines_starting
    from server.lifecycle import GracefulServer, Lifecycle
    from server.observability.output_tail import OutputTail

    lifecycle, output_tail = Lifecycle(), OutputTail()
    # JSON logs: uvicorn's loggers keep no formatting of their own and go through ours.
    uvicorn_logs = {"log_config": None} if args.log_format == "json" else {}
    output_tail.install()  # before any engine starts: its processes inherit the pipes
    try:
        app = create_app(settings, partial(build_engine, output_tail=output_tail), lifecycle=lifecycle)
        config = uvicorn.Config(app, host=settings.host, port=settings.port, log_level=args.log_level, **uvicorn_logs)
        GracefulServer(config, lifecycle, args.shutdown_timeout, kill_engines_starting).run()
    finally:
        output_tail.close()
    return 0



def _model_spec(registry: Registry, ref: str, args) -> ModelSpec:
    """A local folder when `ref` is one, else a registry version fit for serving."""
    from server.engines.model_folder import check_model_folder

    given = {"engine": args.engine, "dtype": args.dtype, "max_batch_size": args.max_batch_size, "max_model_len": args.max_model_len}
    given = {name: value for name, value in given.items() if value is not None}  # the rest: the version's own
    if args.engine_option:
        given["engine_options"] = engine_option_pairs(args.engine_option)
        check_options(given["engine_options"])
    if os.sep in ref or Path(ref).is_dir():
        path = Path(ref)
        check_model_folder(path, allow_pickle=args.allow_pickle)
        return ModelSpec(name=args.name or path.name.lower(), path=path, allow_pickle=args.allow_pickle, **given)
    version = registry.resolve_for_serving(ref)  # checked now; the server resolves it again as a swap would
    return ModelSpec(name=args.name or version.model, path=version.path, version=version.ref, allow_pickle=version.manifest.allows_pickle, **given)


def _demo(args) -> int:
    from models.demo import ensure_demo_model

    version = ensure_demo_model(Registry(_home(args)))
    print(f"{version.ref} {version.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
