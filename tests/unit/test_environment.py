"""The one gate for outside tools: a missing need skips with its reason, or fails under CI."""

from __future__ import annotations

import pytest

from tests import environment
from tests.environment import NETNS, PROMTOOL, Need, require


@pytest.fixture
def absent(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(environment.NEEDS, "gone-tool", Need(lambda: False, NETNS, "install it"))
    monkeypatch.setitem(environment.NEEDS, "here-tool", Need(lambda: True, PROMTOOL, "n/a"))
    monkeypatch.delenv(NETNS, raising=False)
    monkeypatch.delenv(PROMTOOL, raising=False)


@pytest.mark.usefixtures("absent")
def test_a_missing_tool_skips_with_its_name_and_how_to_get_it() -> None:
    with pytest.raises(pytest.skip.Exception, match="needs gone-tool: install it"):
        require("here-tool", "gone-tool")


@pytest.mark.usefixtures("absent")
def test_a_missing_tool_fails_when_ci_demands_its_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(NETNS, "1")
    with pytest.raises(pytest.fail.Exception, match="EQUILIBRIUM_REQUIRE_NETNS=1"):
        require("gone-tool")


@pytest.mark.usefixtures("absent")
def test_present_tools_pass_and_another_variable_does_not_make_a_need_mandatory(
        monkeypatch: pytest.MonkeyPatch) -> None:
    require("here-tool")
    monkeypatch.setenv(PROMTOOL, "1")
    with pytest.raises(pytest.skip.Exception):
        require("gone-tool")

