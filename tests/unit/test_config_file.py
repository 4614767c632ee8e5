"""The config file alone: parsing, errors that name the field and the line, secrets from
the environment, and the pure plan from what runs to what the file asks."""

from pathlib import Path

import pytest

from models.errors import ConfigError
from server.config.file import load_config
from server.deployments.health import HealthPolicy
from server.deployments.reconcile import PlannedChange, State, drift, plan_changes

GOOD = """\
server:
  port: 9000
  drain_timeout_s: 10
api_key_env: TEST_BATON_KEY
deployments:
  chat:
    model: chat@prod
    strategy: reload
  docs:
    model: docs@2
    on_demand: true
    idle_ttl_s: 60
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "baton.yaml"
    path.write_text(text)
    return path


def test_a_good_file_parses_into_server_settings_and_deployments(tmp_path):
    config = load_config(_write(tmp_path, GOOD))
    assert config.server_settings() == {"port": 9000, "drain_timeout_s": 10}
    assert config.deployments["chat"].model == "chat@prod" and config.deployments["chat"].strategy == "reload"
    assert config.deployments["docs"].on_demand and config.deployments["docs"].idle_ttl_s == 60
    assert config.secrets({"TEST_BATON_KEY": "s3cret"}) == {"api_key": "s3cret"}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (GOOD.replace("strategy: reload", "strategy: teleport"), ":8: deployments.chat.strategy:"),
        (GOOD.replace("idle_ttl_s: 60", "idle_ttl_s: -1"), ":12: deployments.docs.idle_ttl_s:"),
        (GOOD.replace("    on_demand: true\n", "    on_demand: true\n    colour: red\n"), ":12: deployments.docs.colour: Extra inputs"),
        (GOOD.replace("  port: 9000\n", "  port: 9000\n  api_key: plain-text\n"), ":1: server: Value error, api_key cannot be set here"),
        (GOOD.replace("  chat:\n", "  Chat!:\n"), "deployment name 'Chat!'"),
        (GOOD.replace("    strategy: reload\n", "    strategy: reload\n    health: {fallbacks: [chat]}\n"), "Deployment chat names itself among its fallbacks"),
        ("deployments: [chat]\n", ":1: deployments: Input should be a valid dictionary"),
        ("server: {port: 9000\n", "not valid YAML"),
        ("- just\n- a list\n", "must be a mapping"),
        ("[]\n", "must be a mapping"),
        (GOOD.replace("  port: 9000\n", "  port: 99999\n"), ":2: server.port: Input should be less than or equal to 65535"),
        (GOOD.replace("  drain_timeout_s: 10\n", "  drain_timeout_s: -1\n"), ":3: server.drain_timeout_s: Input should be greater than 0"),
        (GOOD.replace("  port: 9000\n", "  port: 9000\n  colour: red\n"), ":3: server.colour: Extra inputs"),
        (GOOD + "  chat:\n    model: chat@1\n", ":13: not valid YAML: the key 'chat' is written twice"),
        (GOOD.replace("  port: 9000\n", "\tport: 9000\n"), ":2: not valid YAML: found character '\\t'"),
    ],
)
def test_a_bad_file_is_refused_naming_the_line_and_the_field(tmp_path, text, words):
    with pytest.raises(ConfigError) as refused:
        load_config(_write(tmp_path, text))
    assert words in str(refused.value) and str(tmp_path / "baton.yaml") in str(refused.value)


def test_a_missing_file_and_a_missing_secret_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="Cannot read"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="TEST_BATON_KEY, which is not set"):
        load_config(_write(tmp_path, GOOD)).secrets({})


def _state(version: str | None, rollout: dict | None = None, **settings) -> State:
    return State.of(
        version,
        settings.get("on_demand", False),
        settings.get("idle_ttl_s", 300.0),
        settings.get("smoke_prompts"),
        settings.get("health", HealthPolicy()),
        settings.get("engine_options", {}),
        **(rollout or {}),
    )


def test_the_plan_deploys_swaps_keeps_and_leaves_unnamed_deployments_alone():
    actual = {"chat": _state("chat@1"), "docs": _state("docs@2"), "old": _state("old@1")}
    desired = {"chat": _state("chat@2"), "docs": _state("docs@2"), "new": _state("new@1")}
    assert plan_changes(actual, desired) == [
        PlannedChange("chat", "swap", "chat@1", "chat@2"),
        PlannedChange("docs", "keep", "docs@2", "docs@2"),
        PlannedChange("new", "deploy", None, "new@1"),
        PlannedChange("old", "unmanaged", "old@1", None),
    ]
    assert drift(plan_changes(actual, desired)) == ["~ chat: swap chat@1 -> chat@2", "+ new: deploy new@1"]


def test_settings_change_in_place_and_new_engine_options_swap():
    actual = {"chat": _state("chat@1", smoke_prompts=["Hi"]), "docs": _state("docs@1", on_demand=True, idle_ttl_s=60), "code": _state("code@1")}
    desired = {
        "chat": _state("chat@1", smoke_prompts=["Hello"], health=HealthPolicy(on_breach="rollback"), engine_options={"max_model_len": 512}),
        "docs": _state("docs@2", on_demand=True, idle_ttl_s=600),
        "code": _state("code@1", on_demand=True),
    }
    chat, code, docs = plan_changes(actual, desired)
    assert (chat.action, chat.settings, chat.new_engine_options) == ("swap", ("smoke_prompts", "health"), True)
    assert (docs.action, docs.settings, docs.new_engine_options) == ("swap", ("idle_ttl_s",), False)
    assert (code.action, code.settings) == ("update", ("on_demand", "idle_ttl_s"))
    assert drift([chat, code]) == [
        "~ chat: swap chat@1 -> chat@1 with new engine options; set smoke_prompts, health",
        "~ code: code@1; set on_demand, idle_ttl_s",
    ]


def test_an_idle_ttl_without_on_demand_is_no_difference():
    assert plan_changes({"chat": _state("chat@1", idle_ttl_s=60)}, {"chat": _state("chat@1", idle_ttl_s=600)})[0].action == "keep"


def test_nothing_to_do_is_no_drift():
    assert drift(plan_changes({"chat": _state("chat@2")}, {"chat": _state("chat@2")})) == []


def test_a_file_that_rolls_out_sends_a_new_version_out_as_a_canary_and_lets_it_roll_out():
    rolls_out = _state("chat@2", {"rolls_out": True})
    (fresh,) = plan_changes({"chat": _state("chat@1")}, {"chat": rolls_out})
    (replacing,) = plan_changes({"chat": _state("chat@1", {"canary": "chat@3"})}, {"chat": rolls_out})
    (rolling,) = plan_changes({"chat": _state("chat@1", {"canary": "chat@2"}, smoke_prompts=["Hi"])}, {"chat": rolls_out})
    (done,) = plan_changes({"chat": _state("chat@2")}, {"chat": rolls_out})
    assert [c.action for c in (fresh, replacing, rolling, done)] == ["canary", "canary", "rolling", "keep"]
    assert (fresh.describe(), replacing.describe()) == ("~ chat: canary chat@2 beside chat@1", "~ chat: canary chat@2 beside chat@1, aborting canary chat@3")
    assert rolling.describe() == "= chat: chat@1, canary chat@2 rolling out; set smoke_prompts"
    assert drift([fresh, replacing, rolling, done]) == [fresh.describe(), replacing.describe()]  # rolling out is on the way, not drift


def test_a_rollout_whose_canary_was_aborted_is_halted_until_the_file_names_another_version():
    aborted = {"aborted": "chat@2"}
    (halted,) = plan_changes({"chat": _state("chat@1", aborted)}, {"chat": _state("chat@2", {"rolls_out": True})})
    (next_version,) = plan_changes({"chat": _state("chat@1", aborted)}, {"chat": _state("chat@3", {"rolls_out": True})})
    (no_rollout,) = plan_changes({"chat": _state("chat@1", aborted)}, {"chat": _state("chat@2")})  # the file swaps it, as it says
    assert [c.action for c in (halted, next_version, no_rollout)] == ["halted", "canary", "swap"]
    assert halted.describe() == "! chat: chat@1; the canary of chat@2 was aborted (start it again by hand, or name another version)"
    assert halted.is_drift  # said where drift is said: the file and what runs differ


def test_a_canary_goes_only_where_one_can_run_else_the_strategy_swaps():
    rolls_out = {"rolls_out": True}
    (unloaded,) = plan_changes({"docs": _state("docs@1", {"is_loaded": False}, on_demand=True)}, {"docs": _state("docs@2", rolls_out, on_demand=True)})
    (new_options,) = plan_changes({"chat": _state("chat@1")}, {"chat": _state("chat@2", rolls_out, engine_options={"max_model_len": 512})})
    assert (unloaded.action, new_options.action) == ("swap", "swap")


def test_the_file_naming_a_running_canary_promotes_it():
    (promote,) = plan_changes({"chat": _state("chat@1", {"canary": "chat@2"})}, {"chat": _state("chat@2")})
    (kept,) = plan_changes({"chat": _state("chat@1", {"canary": "chat@2"})}, {"chat": _state("chat@1")})  # an operator's canary: left
    assert promote.describe() == "~ chat: promote canary chat@2 over chat@1" and promote.is_drift
    assert kept.describe() == "= chat: chat@1 (canary chat@2 beside it)" and not kept.is_drift


def test_a_rollout_whose_steps_do_not_go_up_from_its_weight_is_refused(tmp_path):
    config = GOOD + "    canary: {weight: 30, analysis: {promote_after_s: 60, steps: [20, 50]}}\n"
    with pytest.raises(ConfigError, match=r"deployments.docs.canary.*20% is not above it"):
        load_config(_write(tmp_path, config))
    rollout = load_config(_write(tmp_path, config.replace("[20, 50]", "[40, 50]"))).deployments["docs"].canary
    assert (rollout.weight, rollout.analysis.steps, rollout.analysis.promote_after_s) == (30, [40, 50], 60)


def test_a_rollout_may_start_as_a_mirror_only_never_as_nothing(tmp_path):
    mirrored = load_config(_write(tmp_path, GOOD + "    canary: {weight: 0, mirror: 25}\n")).deployments["docs"].canary
    assert (mirrored.weight, mirrored.mirror) == (0, 25)
    with pytest.raises(ConfigError, match=r"deployments.docs.canary.*weight 0 serves nothing"):
        load_config(_write(tmp_path, GOOD + "    canary: {weight: 0}\n"))


def test_the_documented_example_loads():
    example = load_config(Path(__file__).resolve().parents[2] / "docker" / "baton.example.yaml")
    assert example.deployments["chat"].health.on_breach == "rollback"
    assert example.deployments["docs"].on_demand and example.api_key_env == "BATON_API_KEY"


def test_baton_environment_variables_override_the_server_section(monkeypatch):
    from server.config.file import environment_overrides

    monkeypatch.setenv("BATON_DRAIN_TIMEOUT_S", "7.5")
    monkeypatch.setenv("BATON_SMOKE_PROMPTS", '["Hi", "Bonjour"]')
    monkeypatch.setenv("BATON_API_KEY", "never-read-this-way")
    monkeypatch.setenv("BATON_REQUIRE_VLLM", "1")  # not a setting: ignored
    overrides = environment_overrides()
    assert overrides["drain_timeout_s"] == 7.5 and overrides["smoke_prompts"] == ["Hi", "Bonjour"]
    assert "api_key" not in overrides


def test_a_bad_environment_value_names_its_variable(monkeypatch):
    from server.config.file import environment_overrides

    monkeypatch.setenv("BATON_PORT", "eighty")
    with pytest.raises(ConfigError, match="BATON_PORT"):
        environment_overrides()
    monkeypatch.setenv("BATON_PORT", "99999")  # bounds too, before anything starts
    with pytest.raises(ConfigError, match="BATON_PORT: Input should be less than or equal to 65535"):
        environment_overrides()


def test_server_settings_a_reload_cannot_change_are_named(tmp_path):
    from server.config.settings import Settings

    running = Settings(home=tmp_path, port=9000, drain_timeout_s=10, memory_budget_bytes=1, standby_host_budget_bytes=0)
    config = load_config(_write(tmp_path, GOOD.replace("drain_timeout_s: 10", "drain_timeout_s: 5")))
    assert config.restart_needed(running, {}) == ["! server.drain_timeout_s: 10.0 -> 5.0 (at the next start; a reload changes deployments only)"]
    assert config.restart_needed(running, {"drain_timeout_s": 10}) == []  # BATON_DRAIN_TIMEOUT_S wins over the file


def test_a_null_server_setting_is_its_default(tmp_path):
    assert load_config(_write(tmp_path, "server: {port: null, drain_timeout_s: 5}\n")).server_settings() == {"drain_timeout_s": 5}
