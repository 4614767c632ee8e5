"""Which way a swap goes: a pure decision over facts the manager gathers, so every rule is a
unit test (nano-vllm's scheduler: policy without I/O).

`auto` takes the fastest strategy that is safe, in this order:
  standby     the target is loaded or asleep beside the active version: flip, or wake and flip
  blue-green  (first) the target shares the running engine (a base and its unmerged LoRA
              adapters): its adapter loads in milliseconds, beside the active version
  reload      same layout, and the engine reloads in place: hold, drain, swap weights, resume
  blue-green  the memory plan fits both: load beside, flip, drain (no request waits)
  replace     the last resort: the old version sleeps or unloads, new requests wait in a queue
A deployment left down by a dead engine is simply loaded (`load`), whatever was asked; an
on-demand one with nothing loaded is retargeted (`on-demand`): its next request loads the
target, and nothing is loaded now.
Under `auto`, a swap that changes only how output is read (`tool_parser`, `reasoning_parser`) is `in-place`:
the running slot takes the new options, no engine starts or reloads, nothing waits.
An explicit strategy that cannot apply is refused before anything stops, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from models.errors import ConflictError, InvalidRequestError

STRATEGIES = ("auto", "standby", "reload", "blue-green", "replace")


@dataclass(frozen=True)
class SwapFacts:
    is_down: bool  # nothing serves: its engine died and did not restart
    is_on_standby: bool  # the target is the deployment's standby slot
    reload_blocker: str | None  # why weights cannot be reloaded in place; None: they can
    needed_bytes: int  # what the target would hold of the memory budget, loaded beside
    free_bytes: int  # what is left now where it would load
    free_in: str = "the memory budget"  # where that is, for the reason given
    changes_output_only: bool = False  # the active version, only its output options (tool_parser, reasoning_parser) new
    is_unloaded: bool = False  # on demand, nothing loaded: its next request loads what it serves
    wakes_in_turn: bool = False  # the standby sleeps and cannot be awake beside the active version
    joins_running_engine: bool = False  # the target shares an engine that runs (its base's, LoRA on): it loads an adapter, no weights


@dataclass(frozen=True)
class Choice:
    strategy: str
    reason: str


def choose_strategy(requested: str, facts: SwapFacts) -> Choice:
    if requested not in STRATEGIES:
        raise InvalidRequestError(f"Unknown strategy {requested!r}; use one of {', '.join(STRATEGIES)}.", param="strategy")
    if facts.is_unloaded:  # nothing to swap out: any strategy is a change of what loads next
        return Choice("on-demand", "nothing is loaded: the next request loads the new version")
    if facts.is_down:  # there is nothing to drain, keep or reload into: any strategy is a load
        return Choice("load", "the deployment is down: its engine died and did not restart")
    if requested == "auto" and facts.changes_output_only:
        return Choice("in-place", "only how output is read changes: the engine stays as it is")
    if requested == "auto":
        return _fastest(facts)
    if refusal := _refusal(requested, facts):
        raise ConflictError(f"Cannot swap with {requested}: {refusal}.", code="strategy_not_applicable")
    return Choice(requested, "asked for")


# What each strategy makes requests go through, for a swap's preview (`--dry-run`).
EFFECTS = {
    "standby": (False, "a flip to the loaded version (woken first where it sleeps); no request waits"),
    "reload": (True, "new requests wait while those in flight finish and the weights reload in the running engine (under a second on a GPU)"),
    "blue-green": (False, "the new version loads beside the old one, then takes the traffic; no request waits"),
    "replace": (True, "new requests wait in the queue while the old version drains and the new one starts (a cold start)"),
    "in-place": (False, "the running engine reads its output anew; nothing waits, nothing loads"),
    "on-demand": (False, "nothing loads now; the next request loads the new version"),
    "load": (True, "requests wait while the version loads (nothing serves now)"),
}


def preview(choice: Choice, facts: SwapFacts) -> dict:
    """What a swap would do, said before it does anything: its strategy and why, whether new
    requests would wait, and the memory a load beside the active version needs and has."""
    requests_wait, effect = EFFECTS[choice.strategy]
    if choice.strategy == "standby" and facts.wakes_in_turn:
        requests_wait, effect = True, "new requests wait while the active version drains and sleeps and the standby wakes (both cannot be awake)"
    return {
        "strategy": choice.strategy,
        "strategy_reason": choice.reason,
        "requests_wait": requests_wait,
        "effect": effect,
        "reload_blocker": facts.reload_blocker,
        "needed_bytes": facts.needed_bytes,
        "free_bytes": max(facts.free_bytes, 0),
        "free_in": facts.free_in,
    }


def _fastest(facts: SwapFacts) -> Choice:
    if facts.is_on_standby:
        return Choice("standby", "the target is on standby")
    if facts.joins_running_engine:
        return Choice("blue-green", "it shares the running engine of its base weights (LoRA on): only its adapter loads, beside the active version")
    if facts.reload_blocker is None:
        return Choice("reload", "same layout: weights swap inside the running engine")
    why_not_reload = f"no reload ({facts.reload_blocker})"
    if (shortfall := _no_room(facts)) is None:
        return Choice("blue-green", f"{why_not_reload}; both fit {facts.free_in}")
    return Choice("replace", f"{why_not_reload}; {shortfall}")


def _refusal(strategy: str, facts: SwapFacts) -> str | None:
    if strategy == "standby" and not facts.is_on_standby:
        return "the target is not on standby; use auto, blue-green or replace"
    if strategy == "reload" and facts.reload_blocker is not None:
        return facts.reload_blocker
    if strategy == "blue-green" and (shortfall := _no_room(facts)):
        return shortfall + "; use auto or replace"
    return None


def no_room_beside(needed_bytes: int, free_bytes: int, free_in: str) -> str | None:
    """Why a version cannot load beside what runs (blue-green, a canary), if it cannot."""
    if needed_bytes <= free_bytes:
        return None
    return f"loading beside needs {needed_bytes} bytes and {free_in} has {max(free_bytes, 0)} free"


def _no_room(facts: SwapFacts) -> str | None:
    return no_room_beside(facts.needed_bytes, facts.free_bytes, facts.free_in)
