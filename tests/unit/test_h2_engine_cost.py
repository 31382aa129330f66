"""``scripts/h2_engine_cost.py``: both engines carry a unary gRPC call whole, call after call
on one connection (the measurement checks every answer, so a wrong binding fails here)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.environment import require

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "h2_engine_cost.py"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("h2_engine_cost", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_the_h2_library_answers_every_call(script: ModuleType) -> None:
    pair = script.Pair()
    assert script.measure(pair.call, 50) > 0
    assert pair.call() == (b"200", script.MESSAGE, b"0")


def test_the_sidecars_libnghttp2_binding_answers_every_call(script: ModuleType) -> None:
    require("libnghttp2")  # skipped with its reason on a machine without it; CI has it
    pair = script.Pair(script.ng_connection)
    assert script.measure(pair.call, 50) > 0
    assert pair.call() == (b"200", script.MESSAGE, b"0")


def test_a_wrong_answer_fails_the_measurement(script: ModuleType) -> None:
    with pytest.raises(AssertionError, match="wrong answer"):
        script.measure(lambda: (b"200", b"", b"0"), 1)
