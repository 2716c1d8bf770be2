"""The examples in examples/ run and say what they claim."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).parents[2]


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"examples_{name}", ROOT / "examples" /
                                                  f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def test_router_example_routes_hands_off_and_fans_out(tmp_path: Path) -> None:
    router = _load("router")
    lines = await router.main(str(tmp_path / "router.db"))
    assert lines[0] == ("'I want a refund for order 42' -> billing: Done: refund of 1299 "
                        "cents for order 42 issued.")
    assert lines[1] == "'Where is my parcel?' -> shipping: Order 42 is shipped with DHL."
    assert lines[2].startswith("orchestrator (4 model calls in all")
    assert "[research] notes on: facts about" in lines[2]
    assert "[critic] notes on: risks of" in lines[2]
