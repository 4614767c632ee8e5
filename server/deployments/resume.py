"""What a restart brings back: pure rules over what the last run saved (the registry's saved
deployments) and what the start-up settings name.

Rules: with flags (`baton serve --model`), every saved deployment comes back, each where it
was unless the flags now name another version (`start_point`). With a config file the file
is the truth, but a rollout under way is not skipped: a deployment whose file names a canary
rollout starts from the version it served before the restart, its canary back beside it
where that is the file's version, and a reload after start carries the file out from there
(a new canary, or a promotion). Every other deployment starts as the file says.
"""

from __future__ import annotations

from server.config.settings import ModelSpec


def start_point(named: str, overrides: dict, saved: dict | None, resumes_rollout: bool = False) -> tuple[str, dict]:
    """The version and engine overrides a deployment named at start-up starts with: what it
    served before the restart, unless the start-up settings now name another version than
    when that was saved (the operator's new choice wins); a rollout resumes from what it
    served whatever the file names now (the file's version comes as its canary)."""
    if saved and saved.get("version") and (resumes_rollout or saved.get("started_as") == named):
        return saved["version"], saved.get("engine_overrides") or {}
    return named, overrides


def to_restore(saved: dict[str, dict], specs: list[ModelSpec], from_file: bool) -> dict[str, dict]:
    """The saved deployments a start brings back (`saved` by name). From a config file: only
    its rollouts (not on demand, where no canary runs), each with its canary where that is
    the version the file now names."""
    if not from_file:
        return saved
    rollouts = {spec.name: spec.version for spec in specs if spec.rolls_out and not spec.on_demand}
    kept = {}
    for name, state in saved.items():
        if name in rollouts and not state.get("on_demand"):
            canary = state.get("canary")
            kept[name] = state | {"canary": canary if canary and canary["version"] == rollouts[name] else None}
    return kept
