"""`baton deploy | undeploy | swap | rollback | unload | canary | deployments`: deployments live in a running
server, so these commands talk to its admin API (--server, default http://127.0.0.1:8000)."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from pathlib import Path

from server.cli.admin_client import AdminClient
from server.cli.models import engine_option_pairs
from server.config.file import load_config

DEFAULT_SERVER = "http://127.0.0.1:8000"


def add_commands(commands) -> None:
    def command(name: str, help: str, run):
        parser = commands.add_parser(name, help=help)
        parser.add_argument("--server", default=os.environ.get("BATON_SERVER", DEFAULT_SERVER), help="the baton server (default: $BATON_SERVER or %(default)s)")
        parser.add_argument("--admin-key", default=os.environ.get("BATON_ADMIN_KEY"))
        parser.add_argument("--reason", default="")
        parser.set_defaults(run=lambda args: run(AdminClient(args.server, args.admin_key, getpass.getuser()), args))
        return parser

    deploy = command("deploy", "serve a registry version under a stable name", _deploy)
    deploy.add_argument("name")
    deploy.add_argument("--model", required=True, help="a registry ref: chat, chat@2, chat@prod")
    deploy.add_argument("--on-demand", action="store_true", help="load on the first request; unload when idle")
    deploy.add_argument("--idle-ttl", type=float, default=300.0, help="seconds idle before an on-demand unload (default 300)")

    undeploy = command("undeploy", "stop serving a deployment (its requests drain first) and forget it", lambda client, args: _follow(client, client.undeploy(args.name, args.reason)))
    undeploy.add_argument("name")

    swap = command("swap", "swap the version behind a deployment, draining requests", _swap)
    swap.add_argument("name")
    swap.add_argument("--to", required=True)
    swap.add_argument("--strategy", default="auto", choices=["auto", "standby", "reload", "blue-green", "replace"], help="default auto: the fastest that is safe")
    swap.add_argument(
        "--engine-option", action="append", default=None, metavar="KEY=VALUE",
        help="the deployment's engine options from now on (values are JSON); to --to its own version, this restarts its engine with them",
    )  # fmt: skip
    swap.add_argument("--dry-run", action="store_true", help="say what the swap would do (strategy, why, whether requests wait) and do nothing")

    rollback = command("rollback", "go back to the previous version", _rollback)
    rollback.add_argument("name")
    rollback.add_argument("--dry-run", action="store_true", help="say what the rollback would do and do nothing")
    unload = command("unload", "stop an on-demand deployment's engine now (its requests drain first); its next request loads it", lambda client, args: _follow(client, client.unload(args.name, args.reason)))
    unload.add_argument("name")

    canary = command("canary", "send a share of traffic to a version; then: --weight W | promote | abort", _canary)
    canary.add_argument("name")
    canary.add_argument("decision", nargs="?", choices=["promote", "abort"])
    canary.add_argument("--to")
    canary.add_argument("--weight", type=int, help="percent of requests (default 10; 0 with --mirror); without --to, the running canary's new share")
    canary.add_argument("--mirror", type=int, default=0, metavar="P", help="with --to: copies of P percent of the active version's requests go to it too, their answers dropped")
    canary.add_argument("--auto", action="store_true", help="baton judges it against the active version (or the deployment's slo) and aborts it on a breach")
    canary.add_argument("--promote-after", type=float, metavar="S", help="with --auto: S seconds within objectives at each weight, then the next step, then promotion")
    canary.add_argument("--steps", type=_weights, metavar="W,W", default=[], help="with --promote-after: weights to move through before promotion (25,50)")

    command("deployments", "list deployments: version, state, in-flight, canary, standby", _list)

    plan = command("plan", "check a config file and print what it would change on the server, changing nothing", _plan)
    plan.add_argument("--config", type=Path, required=True)

    command("reload", "make the server read its config file again and converge on it (as SIGHUP does)", _reload)

    status = command("status", "deployments, memory and GPUs of a running server, as tables", _status)
    status.add_argument("--watch", nargs="?", type=float, const=2.0, default=None, metavar="SECONDS", help="refresh every SECONDS (default 2) until Ctrl-C")


def _plan(client: AdminClient, args) -> int:
    config = load_config(args.config)  # errors name the field and its line, before the server is asked
    planned = client.plan(config.model_dump(mode="json")["deployments"], config.model_dump(mode="json", exclude_none=True)["server"])
    for line in [change["text"] for change in planned["changes"]] + planned["restart_needed"]:
        print(line)
    return 0


def _reload(client: AdminClient, args) -> int:
    result = client.reload(args.reason)
    for change in result["changes"]:
        detail = f" ({change['error']})" if change.get("error") else ""
        print(f"{change['deployment']}: {change['action']} {change['status']}{detail}")
    for line in result["restart_needed"]:
        print(line)
    return 1 if any(change["status"] == "failed" for change in result["changes"]) else 0


def _deploy(client: AdminClient, args) -> int:
    deployment = client.deploy(args.name, args.model, args.reason, args.on_demand, args.idle_ttl)
    if deployment["on_demand"]:
        print(f"{deployment['name']} will load {deployment['on_demand']['version']} on its first request")
    else:
        print(f"{deployment['name']} serves {deployment['version']}")
    return 0


def _swap(client: AdminClient, args) -> int:
    engine_options = None if args.engine_option is None else engine_option_pairs(args.engine_option)
    if args.dry_run:
        print(format_preview(client.preview_swap(args.name, args.to, args.strategy, engine_options)))
        return 0
    return _follow(client, client.swap(args.name, args.to, args.strategy, args.reason, engine_options))


class _LiveLine:
    """The running phase and its seconds so far, redrawn in place; nothing where output is
    not a terminal (logs and pipes get the finished phases only)."""

    def __init__(self, is_terminal: bool):
        self._is_terminal = is_terminal
        self._phase, self._since, self._is_shown = "", 0.0, False

    def show(self, phase: str) -> None:
        if not self._is_terminal:
            return
        if phase != self._phase:
            self._phase, self._since = phase, time.monotonic()
        print(f"\r\033[K  {phase:<8} {time.monotonic() - self._since:8.1f} s ...", end="", flush=True)
        self._is_shown = True

    def clear(self) -> None:
        if self._is_shown:
            print("\r\033[K", end="", flush=True)
            self._is_shown = False


def _rollback(client: AdminClient, args) -> int:
    if args.dry_run:
        print(format_preview(client.preview_rollback(args.name)))
        return 0
    return _follow(client, client.rollback(args.name, args.reason))


def format_preview(plan: dict) -> str:
    lines = [
        f"dry run: swap {plan['deployment']} {plan['from_version'] or '-'} -> {plan['to_version']} would be {plan['strategy']} ({plan['strategy_reason']})",
        f"  {plan['effect']}",
    ]
    if plan["strategy"] in ("blue-green", "replace"):
        lines.append(f"  beside the active version it needs {_gib(plan['needed_bytes'])}; {plan['free_in']} has {_gib(plan['free_bytes'])} free")
    return "\n".join(lines + ["nothing was changed"])


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.1f} GiB"


def _canary(client: AdminClient, args) -> int:
    if args.mirror and not args.to:
        print("baton: error: --mirror starts a canary: it needs --to REF")
        return 2
    if args.decision:
        return _follow(client, client.decide_canary(args.name, args.decision, args.reason))
    if not args.to and args.weight is not None:
        return _follow(client, client.step_canary(args.name, args.weight, args.reason))
    if not args.to:
        print("baton: error: canary needs --to REF (or --weight W, promote | abort)")
        return 2
    if (args.promote_after is not None or args.steps) and not args.auto:
        print("baton: error: --promote-after and --steps need --auto")
        return 2
    analysis = {"promote_after_s": args.promote_after, "steps": args.steps} if args.auto else None
    weight = args.weight if args.weight is not None else 0 if args.mirror else 10
    return _follow(client, client.canary(args.name, args.to, weight, args.reason, analysis, args.mirror))


def canary_share(canary: dict, of: str = "") -> str:
    """`10%` (`of` after it), and `, 20% mirrored` where the canary gets copies of requests too."""
    return f"{canary['weight']}%{of}" + (f", {canary['mirror']}% mirrored" if canary.get("mirror") else "")


def _weights(text: str) -> list[int]:
    try:
        return [int(weight) for weight in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a list of weights such as 25,50") from None


def _follow(client: AdminClient, record: dict) -> int:
    """Print each phase as it finishes, until the swap ends; on a terminal, the phase running
    now counts its seconds on a line of its own (a cold start on a GPU takes a minute)."""
    why = f": {record['strategy_reason']}" if record.get("strategy_reason") else ""
    print(f"{record['id']}: {record['action']} {record['deployment']} {record['from_version'] or '-'} -> {record['to_version'] or '-'} ({record['strategy']}{why})")
    num_printed, live = 0, _LiveLine(sys.stdout.isatty())
    while True:
        finished = [p for p in record["phases"] if p["duration_s"] is not None]
        for phase in finished[num_printed:]:
            detail = f"  {phase['detail']}" if phase["detail"] else ""
            live.clear()
            print(f"  {phase['name']:<8} {phase['duration_s']:8.3f} s{detail}")
        num_printed = len(finished)
        if record["status"] != "running":
            break
        if running := [p["name"] for p in record["phases"] if p["duration_s"] is None]:
            live.show(running[-1])
        time.sleep(0.2)
        record = client.swap_status(record["id"])
    live.clear()
    if record["status"] == "failed":
        print(f"failed: {record['error']}")
        return 1
    if record["action"] == "remove":
        print(f"removed: {record['deployment']} serves no more")
        return 0
    if record["action"] == "unload":
        print(f"unloaded: {record['deployment']} loads {record['from_version']} again on its next request")
        return 0
    deployment = client.deployment(record["deployment"])
    canary = deployment["canary"]
    share = f" ({100 - canary['weight']}%), canary {canary['version']} ({canary_share(canary)}{', judged by baton' if canary['analysis'] else ''})" if canary else ""
    print(f"{record['status']}: {record['deployment']} serves {deployment['version']}{share}")
    return 0


def _status(client: AdminClient, args) -> int:
    while True:
        report = format_status(client.status())
        if args.watch is None:
            print(report)
            return 0
        print("\033[2J\033[H" + report, flush=True)  # clear the terminal, then redraw
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0


def format_status(status: dict) -> str:
    """/admin/status as terminal tables: deployments and slots, the memory budget, GPUs."""
    gib = _gib
    lines = [f"{'DEPLOYMENT':<14} {'ROLE':<8} {'VERSION':<18} {'STATE':<9} {'ENGINE':<13} {'IN-FLIGHT':>9} {'WAITING':>7} {'MEMORY':>10}  PLAN"]
    for d in status["deployments"]:
        for role in ("active", "canary", "standby"):
            slot = d[role]
            if slot:
                waiting = d["waiting"] if role == "active" else ""
                plan = slot.get("memory_plan", "")
                if role == "canary":
                    plan = f"{canary_share(slot, ' of requests')}{', judged by baton' if slot['analysis'] else ''}" + (f"; {plan}" if plan else "")
                lines.append(f"{d['name']:<14} {role:<8} {slot['version']:<18} {slot['state']:<9} {slot['engine']:<13} {slot['in_flight']:>9} {waiting:>7} {gib(slot['memory_bytes']):>10}  {plan}")
        if not d["active"]:
            lines.append(f"{d['name']:<14} {'-':<8} {d['version'] or '-':<18} {d['state']:<9} {'-':<13} {d['in_flight']:>9} {d['waiting']:>7}")
    lines += _config_lines(status)
    lines.append(f"\nmemory budget: {gib(status['memory_in_use_bytes'])} in use of {gib(status['memory_budget_bytes'])}")
    gpus = status["gpus"]
    if not gpus["available"]:
        lines.append("GPUs: none (no NVML driver or device)")
        return "\n".join(lines)
    lines.append(f"\n{'GPU':<4} {'NAME':<24} {'UTIL':>5} {'MEMORY':>21} {'POWER':>7} {'TEMP':>5}  ENGINES" + ("  (stale: NVML is failing)" if gpus["stale"] else ""))
    for g in gpus["devices"]:
        engines = ", ".join(f"{e['deployment']} {e['version']} {gib(e['memory_bytes'])}" for e in g["engines"]) or "-"
        memory = f"{gib(g['memory_used_bytes'])} / {gib(g['memory_total_bytes'])}"
        lines.append(f"{g['index']:<4} {g['name'][:24]:<24} {g['utilization_percent']:>4.0f}% {memory:>21} {g['power_watts']:>6.0f}W {g['temperature_celsius']:>4.0f}C  {engines}")
    return "\n".join(lines)


def _config_lines(status: dict) -> list[str]:
    """With a config file: whether what runs is what it says (a halted rollout, an admin change)."""
    if "config_file" not in status:
        return []
    if status["drift"] is None:
        return [f"\nconfig {status['config_file']}: cannot be read: {status['config_error']}"]
    return [f"\nconfig {status['config_file']}: " + ("what runs is what it says" if not status["drift"] else "differs"), *(f"  {line}" for line in status["drift"])]


def _list(client: AdminClient, args) -> int:
    print(f"{'NAME':<16} {'VERSION':<20} {'STATE':<9} {'IN-FLIGHT':>9}  {'CANARY':<24} STANDBY")
    for d in client.deployments():
        canary = f"{d['canary']['version']} ({canary_share(d['canary'])}{', auto' if d['canary']['analysis'] else ''})" if d["canary"] else "-"
        standby = d["standby"]["version"] if d["standby"] else "-"
        print(f"{d['name']:<16} {d['version'] or '-':<20} {d['state']:<9} {d['in_flight']:>9}  {canary:<24} {standby}")
    return 0
