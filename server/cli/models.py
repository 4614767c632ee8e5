"""`baton models ...`: the registry from the command line, local or through --server URL."""

from __future__ import annotations

import getpass
import json
import os
from pathlib import Path

from models.catalog import Change
from models.registry import ImportOptions, Registry
from server.cli.admin_client import AdminClient
from models.errors import InvalidRequestError
from server.api.model_admin import ModelAdmin


def add_commands(commands, home_of) -> None:
    parser = commands.add_parser("models", help="the model registry: import, list, alias, verify, remove")
    parser.add_argument("--server", help="use a running server's admin API at this URL instead of the local registry")
    parser.add_argument("--admin-key", default=os.environ.get("BATON_ADMIN_KEY"), help="for --server (default: $BATON_ADMIN_KEY)")
    actions = parser.add_subparsers(required=True, metavar="ACTION")

    imports = actions.add_parser("import", help="import a folder, hf:ORG/NAME@REVISION or gguf:FILE as a new version")
    imports.add_argument("source")
    imports.add_argument("--name", required=True)
    imports.add_argument("--allow-pickle", action="store_true", help="accept .bin/.pt weights (they can run code)")
    imports.add_argument("--trust-remote-code", action="store_true", help="accept models that ship Python code")
    imports.add_argument("--engine", choices=["auto", "vllm", "transformers"], help="engine option recorded in the manifest")
    imports.add_argument("--dtype", help="engine option recorded in the manifest")
    imports.add_argument("--max-model-len", type=int, help="engine option recorded in the manifest")
    imports.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE", help="any other engine option (gpu_memory_utilization=0.45); values are JSON")
    imports.add_argument("--base", metavar="REF", help="for a LoRA adapter: the version it was trained on (chat@3); the adapter is merged into it")
    imports.add_argument(
        "--unmerged", action="store_true", help="with --base: keep the adapter apart; vLLM serves it beside the base's weights, and swaps among a base's adapters load no weights"
    )
    imports.add_argument(
        "--move", action="store_true", help="a local model folder: its files leave it for the store (linked, not copied, on the same filesystem), as mv would; a checkpoint is stored once"
    )
    imports.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    imports.add_argument("--notes", default="")
    imports.add_argument("--reason", default="")
    imports.set_defaults(action=_import)

    actions.add_parser("list", help="every version of every model").set_defaults(action=_list)
    show = actions.add_parser("show", help="a model's versions, or one version's manifest (NAME@VERSION)")
    show.add_argument("ref")
    show.set_defaults(action=lambda admin, args: _print(admin.show(args.ref)))

    alias = actions.add_parser("alias", help="point ALIAS at a version (moves it if it exists)")
    alias.add_argument("name")
    alias.add_argument("version")
    alias.add_argument("alias")
    alias.add_argument("--reason", default="")
    alias.set_defaults(action=lambda admin, args: _print(admin.alias(args.name, args.version, args.alias, _change(args))))

    verify = actions.add_parser("verify", help="re-hash every file of a version")
    verify.add_argument("ref")
    verify.set_defaults(action=_verify)

    remove = actions.add_parser("rm", help="delete a version (refused while aliased, unless --force)")
    remove.add_argument("ref")
    remove.add_argument("--force", action="store_true")
    remove.add_argument("--reason", default="")
    remove.set_defaults(action=lambda admin, args: _print(admin.remove(args.ref, _change(args), force=args.force)))

    prune = actions.add_parser("prune", help="delete a model's versions older than its newest N, but those aliased or deployed; then gc")
    prune.add_argument("name")
    prune.add_argument("--keep", type=int, required=True, metavar="N", help="the newest versions kept, held or not (at least 1)")
    prune.add_argument("--dry-run", action="store_true", help="print what would be deleted, and delete nothing")
    prune.add_argument("--reason", default="")
    prune.set_defaults(action=lambda admin, args: _print(admin.prune(args.name, args.keep, _change(args), dry_run=args.dry_run)))

    actions.add_parser("gc", help="delete stored files no version uses").set_defaults(action=lambda admin, args: _print(admin.collect_garbage()))

    history = actions.add_parser("history", help="registrations, alias moves, deletions, deploys of a model")
    history.add_argument("name")
    history.set_defaults(action=_history)

    parser.set_defaults(run=lambda args: _run(args, home_of(args)))


def _run(args, home: Path) -> int:
    if args.server:
        admin = AdminClient(args.server, args.admin_key, getpass.getuser())
    else:
        admin = ModelAdmin(Registry(home))
    return args.action(admin, args) or 0


def _import(admin, args) -> int:
    chosen = (("engine", args.engine), ("dtype", args.dtype), ("max_model_len", args.max_model_len))
    engine_options = engine_option_pairs(args.engine_option)
    engine_options |= {k: v for k, v in chosen if v is not None}
    labels = _pairs(args.label, "label")
    options = ImportOptions(args.allow_pickle, args.trust_remote_code, engine_options, labels, args.notes, show_progress=True, base=args.base, merge=not args.unmerged, move=args.move)
    result = admin.import_model(args.source, args.name, options, _change(args))
    verb = "imported" if result["created"] else "already present as"
    print(f"{verb} {result['ref']} ({result['digest'][:19]}, {_size(result['total_bytes'])})")
    return 0


def engine_option_pairs(items: list[str]) -> dict:
    """--engine-option KEY=VALUE, each VALUE read as JSON where it parses."""
    return {key: _json_or_text(value) for key, value in _pairs(items, "engine-option").items()}


def _pairs(items: list[str], param: str) -> dict[str, str]:
    if bad := [item for item in items if "=" not in item]:
        raise InvalidRequestError(f"--{param} takes KEY=VALUE, not {bad[0]!r}.", param=param)
    return dict(item.split("=", 1) for item in items)


def _json_or_text(value: str):
    """0.45 -> 0.45, true -> True, awq -> "awq"."""
    try:
        return json.loads(value)
    except ValueError:
        return value


def _list(admin, args) -> int:
    rows = admin.list_models()
    if not rows:
        print("No models yet: `baton models import FOLDER --name NAME` (or hf:REPO, gguf:FILE), or `baton demo`.")
        return 0
    print(f"{'MODEL':<20} {'VERSION':>7}  {'ALIASES':<20} {'SIZE':>9}  {'DIGEST':<19}  STATUS")
    for row in rows:
        status = "CORRUPT" if row["is_corrupt"] else "ok"
        print(f"{row['model']:<20} {row['version']:>7}  {','.join(row['aliases']):<20} {_size(row['total_bytes']):>9}  {row['digest'][:19]}  {status}")
    return 0


def _verify(admin, args) -> int:
    result = admin.verify(args.ref, _change(args), show_progress=True)
    if result["problems"]:
        print(f"{result['ref']} is CORRUPT:\n  " + "\n  ".join(result["problems"]))
        return 1
    print(f"{result['ref']} verified: every file matches its sha256")
    return 0


def _history(admin, args) -> int:
    for event in admin.history(args.name):
        version = f"@{event['version']}" if event["version"] is not None else ""
        reason = f" ({event['reason']})" if event["reason"] else ""
        print(f"{event['at']}  {event['action']:<9} {event['model']}{version}  by {event['actor']}{reason}  {json.dumps(event['details'])}")
    return 0


def _change(args) -> Change:
    return Change(getpass.getuser(), getattr(args, "reason", ""))


def _print(result) -> None:
    print(json.dumps(result, indent=2))


def _size(num_bytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if num_bytes < 1000:
            return f"{num_bytes:.0f} {unit}"
        num_bytes /= 1000
    return f"{num_bytes:.1f} TB"
