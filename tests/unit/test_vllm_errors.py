"""vLLM's errors as baton passes them on: one that points "above" says where above is."""

from server.engines.vllm_engine import _where_the_cause_is


def test_a_failed_engine_core_start_points_to_the_server_log():
    said = _where_the_cause_is(RuntimeError("Engine core initialization failed. See root cause above. Failed core proc(s): {'EngineCore_DP0': 1}"))
    assert said.startswith("Engine core initialization failed") and "in the baton server's log" in said
    assert _where_the_cause_is(ValueError("No config.json")) == "No config.json"
