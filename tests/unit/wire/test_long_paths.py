"""wire.long_paths: which prefixes a declaration of long requests accepts, and what they
cover (the rule both listeners, the Service's annotation and the pod's share)."""

from __future__ import annotations

import pytest

from wire.long_paths import (
    MAX_LONG_PATHS,
    parse_long_path_list,
    parse_long_paths,
    under_long_path,
)


def test_the_comma_form_trims_and_leaves_blanks_out() -> None:
    assert parse_long_path_list(" /watch, /pkg.Config/Watch ,,", "x") == (
        "/watch", "/pkg.Config/Watch")
    assert parse_long_path_list("", "x") == ()
    assert parse_long_path_list(" , ", "x") == ()
    many = ",".join(f"/p{i}" for i in range(MAX_LONG_PATHS))
    assert len(parse_long_path_list(many, "x")) == MAX_LONG_PATHS


@pytest.mark.parametrize(("value", "problem"), [
    ("watch", "not an absolute path"),
    ("/a b", "not an absolute path"),
    ("/a\tb", "not an absolute path"),
    ("/a\x01b", "not an absolute path"),
    ("/a\x7fb", "not an absolute path"),
    ("/wätch", "not an absolute path"),
    ("/" + "a" * 256, "not an absolute path"),
    ("/", "the root would declare every request long"),
    ("//", "the root would declare every request long"),
    ("/watch?x=1", "without a query or a fragment"),
    ("/watch#f", "without a query or a fragment"),
    ("/a/../b", "dot segments"),
    ("/a/./b", "dot segments"),
    ("/.well-known", "dot segments"),
    ("/%2E%2e/x", "dot segments"),
])
def test_a_prefix_no_request_could_be_below_is_refused_by_name(value: str,
                                                                problem: str) -> None:
    """Each of these would match nothing (a target's query is left out before matching, a
    target with dot segments never matches) or everything (the root): refused with the
    reason and the value, never taken silently."""
    with pytest.raises(ValueError, match="what: expected a list") as caught:
        parse_long_path_list(f"/ok,{value}", "what")
    assert problem in str(caught.value)
    assert repr(value)[:20] in str(caught.value)


@pytest.mark.parametrize("value", [None, "/watch", [1], ["/p"] * (MAX_LONG_PATHS + 1)])
def test_anything_but_a_short_list_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match=f"at most {MAX_LONG_PATHS} path prefixes"):
        parse_long_paths(value, "what")


@pytest.mark.parametrize(("target", "covered"), [
    ("/watch", True),
    ("/watch?since=5", True),
    ("/watch/pods", True),
    ("/watchdog", False),
    ("/watch/../admin", False),
    ("/watch/%2E%2E/admin", False),
    ("/other", False),
])
def test_a_prefix_covers_itself_and_what_is_below_by_whole_segments(target: str,
                                                                    covered: bool) -> None:
    assert under_long_path(target, ("/watch",)) is covered
    assert under_long_path(target, ()) is False
