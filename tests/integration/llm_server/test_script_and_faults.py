"""The script engine and the fault specs on their own (no server)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from garrison.errors import ConfigurationError
from garrison.testing import FAULT_GRAMMAR, Fault, Faults, Rule, Script

HI: Any = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(("rules", "message"), [
    ([{"content": "a"}, {"last_usr_contains": "x"}], "script rule 1: key 'last_usr_contains'"),
    ([{"times": "twice"}], "script rule 0: key 'times' must be an integer"),
    ([{"tool_results": True}], "script rule 0: key 'tool_results' must be an integer"),
    ([{"content": 3}], "script rule 0: key 'content' must be a string"),
    ([{"tool_calls": [{"arguments": {}}]}], "script rule 0: key 'tool_calls' [0]: 'name'"),
    ([{"tool_calls": [{"name": "f", "arguments": 1}]}], "'arguments' must be an object"),
    ([{"finish_reason": "done"}], "script rule 0: key 'finish_reason' is 'done'"),
    ([{"last_role": "bot"}], "script rule 0: key 'last_role' is 'bot'"),
    ([{"usage": {"input": 1}}], "script rule 0: key 'usage.input': unknown"),
    ([{"match": {"content": "x"}}], "script rule 0: key match.content: unknown"),
    (["not a rule"], "script rule 0: a rule is an object"),
])
def test_bad_rules_name_their_index_and_key(rules: list[Any], message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Script(rules)
    assert message in str(caught.value)


def test_bad_default_and_bad_top_level_keys() -> None:
    with pytest.raises(ConfigurationError, match="script default: key 'model': unknown"):
        Script(default={"model": "x", "content": "y"})
    with pytest.raises(ConfigurationError, match="script: unknown key 'rule'"):
        Script.from_dict({"rule": []})


def test_from_file_reads_json_and_names_the_file_on_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"rules": [{"content": "from file"}]}))
    broken = tmp_path / "broken.json"
    broken.write_text("{")

    assert Script.from_file(good).reply("m", HI).content == "from file"
    with pytest.raises(ConfigurationError, match="not JSON"):
        Script.from_file(broken)
    with pytest.raises(ConfigurationError, match="cannot read it"):
        Script.from_file(tmp_path / "missing.json")


def test_replies_are_deterministic_with_default_token_counts() -> None:
    script = Script([Rule(tool_calls=[{"name": "f", "arguments": {"a": 1}},
                                      {"name": "g", "arguments": "{}"}])])
    messages: Any = [{"role": "system", "content": "abcd"},
                     {"role": "user", "content": [{"type": "text", "text": "abcdefgh"}]}]

    first = script.reply("model-x", messages)
    again = Script([Rule(tool_calls=[{"name": "f", "arguments": {"a": 1}}])]).reply(
        "model-x", messages)

    assert first.tool_calls[0].id == again.tool_calls[0].id
    assert [c.id[-2:] for c in first.tool_calls] == ["_0", "_1"]
    assert first.tool_calls[0].arguments == '{"a": 1}'
    assert first.finish_reason == "tool_calls"
    assert first.content is None
    assert first.input_tokens == 3  # ceil(12 chars / 4)
    assert first.output_tokens == 3  # ceil((8 + 2) chars of arguments / 4)
    assert script.reply("model-y", messages).tool_calls[0].id != first.tool_calls[0].id


def test_last_tool_is_found_through_the_tool_call_id() -> None:
    script = Script([{"last_tool": "search", "content": "searched: {last_tool_result}"},
                     {"last_tool": "fetch", "content": "fetched"}])
    messages: Any = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "fetch", "arguments": "{}"}},
            {"id": "b", "type": "function", "function": {"name": "search", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "a", "content": "page"},
        {"role": "tool", "tool_call_id": "b", "content": "hits"},
    ]

    assert script.reply("m", messages).content == "searched: hits"
    assert script.reply("m", messages[:-1]).content == "fetched"


def test_times_counts_only_consumed_replies_and_reset_rearms() -> None:
    script = Script([{"times": 1, "content": "once"}])

    peeked = script.reply("m", HI, consume=False)
    used = script.reply("m", HI)
    spent = script.reply("m", HI)
    script.reset()

    assert (peeked.content, used.content, spent.content) == ("once", "once", "ok")
    assert script.reply("m", HI).content == "once"


def test_fault_spec_grammar() -> None:
    faults = Faults.parse("429:0.2@1.5, 503:1x3/model=gpt-primary, timeout:0.05@30, reset:0.05,"
                          "malformed:0.05,stall:0.1@5,truncate:0.05,bad_args:0.1,latency:20-80ms,"
                          "400:1/code=context_length_exceeded/api=anthropic/stream=false,"
                          "503:1/model=meta-llama/Llama-3*")

    assert faults.faults == (
        Fault("status", rate=0.2, status=429, retry_after=1.5),
        Fault("status", rate=1.0, count=3, status=503, model="gpt-primary"),
        Fault("timeout", rate=0.05, seconds=30.0),
        Fault("reset", rate=0.05),
        Fault("malformed", rate=0.05),
        Fault("stall", rate=0.1, seconds=5.0),
        Fault("truncate", rate=0.05),
        Fault("bad_args", rate=0.1),
        Fault("latency", latency_ms=(20.0, 80.0)),
        Fault("status", status=400, error_code="context_length_exceeded", api="anthropic",
              stream=False),
        Fault("status", status=503, model="meta-llama/Llama-3*"),
    )
    assert Faults.parse("").faults == ()


@pytest.mark.parametrize(("spec", "message"), [
    ("429:2", "rate 2.0 must be in 0..1"),
    ("boom:0.1", "kind 'boom'"),
    ("429:x", "expected KIND[:RATE[xCOUNT]][@ARG]"),
    ("reset@3", "reset takes no @ argument"),
    ("latency", "latency needs a range"),
    ("latency:80ms-20", "expected KIND"),
    ("503:1/region=eu", "filter 'region=eu'"),
    ("timeout:1@soon", "@soon must be seconds"),
    ("700:1", "status 700 must be an HTTP error status"),
    ("reset:1/code=x", "filter 'code=x'"),
])
def test_bad_fault_specs_name_the_item_and_show_the_grammar(spec: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Faults.parse(f"500:0.1,{spec}")
    text = str(caught.value)
    assert f"fault spec item {spec!r}" in text
    assert message in text
    assert FAULT_GRAMMAR in text


def test_bad_fault_dicts_are_rejected() -> None:
    with pytest.raises(ConfigurationError, match="fault 0: fault: unknown key 'rate_'"):
        Faults([{"kind": "status", "rate_": 1}])
    with pytest.raises(ConfigurationError, match="'kind' is missing"):
        Faults([{"status": 429}])
    with pytest.raises(ConfigurationError, match="latency_ms"):
        Fault("latency", latency_ms=(50.0, 10.0))


def test_pick_applies_filters_counts_and_one_deciding_fault() -> None:
    faults = Faults([Fault("latency", latency_ms=(5.0, 5.0)),
                     Fault("status", status=503, count=2, model="gpt-primary"),
                     Fault("status", status=429, api="anthropic"),
                     Fault("bad_args", stream=True)])

    picks = [[f.outcome for f in faults.pick("openai", "gpt-primary", False)] for _ in range(3)]

    assert picks == [["latency", "status:503"], ["latency", "status:503"], ["latency"]]
    assert [f.outcome for f in faults.pick("anthropic", "gpt-primary", True)] == [
        "latency", "status:429", "bad_args"]
    assert faults.delay_s(faults.pick("openai", "x", False)) == pytest.approx(0.005)


def test_pick_is_reproducible_from_the_seed() -> None:
    def draws(seed: int) -> list[bool]:
        faults = Faults.parse("500:0.3", seed=seed)
        return [bool(faults.pick("openai", "m", False)) for _ in range(200)]

    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    assert 20 < sum(draws(7)) < 100
