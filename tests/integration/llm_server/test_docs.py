"""The examples in docs/llm-server.md stay valid: scripts load, fault lists and the
grammar match the code."""

from __future__ import annotations

import json
import re
from pathlib import Path

from garrison.testing import FAULT_GRAMMAR, Faults, Script

DOC = (Path(__file__).parents[3] / "docs" / "llm-server.md").read_text()


def test_json_examples_are_a_valid_script_and_valid_faults() -> None:
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", DOC, re.S)]
    scripts = [b for b in blocks if isinstance(b, dict) and "rules" in b]
    fault_lists = [b for b in blocks if isinstance(b, list)]

    assert scripts and fault_lists
    for script in scripts:
        assert Script.from_dict(script).rules
    for faults in fault_lists:
        assert len(Faults(faults).faults) == len(faults)


def test_documented_grammar_is_the_one_in_error_messages() -> None:
    grammar = re.search(r"```\n(faults := .*?)```", DOC, re.S)

    assert grammar is not None
    assert FAULT_GRAMMAR.startswith(grammar.group(1).rstrip("\n"))


def test_documented_spec_items_parse() -> None:
    cells = re.findall(r"^\| (`[^|]+`) \|", DOC, re.M)
    specs = [spec for cell in cells for spec in re.findall(r"`([^`]+)`", cell)
             if re.match(r"^(\d{3}|[a-z_]+):\S+$", spec)]

    assert len(specs) >= 12
    for spec in specs:
        assert Faults.parse(spec).faults, spec
