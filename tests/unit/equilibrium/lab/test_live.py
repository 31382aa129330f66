"""equilibrium.lab.live: the demo's live view, redrawn in place on a terminal and one line a
frame otherwise, and who follows the signaler."""

from __future__ import annotations


def test_live_view_redraws_in_place_on_a_terminal_and_prints_lines_otherwise() -> None:
    import io
    import math

    from equilibrium.lab.live import Frame, LiveView, PodLine

    state = {"upstreams": {"demo": {"policy": "equilibrium", "nash_gap": 0.01, "flapping": 0.0,
                                    "converged": True, "endpoints": [
                                        {"endpoint": "http://127.0.0.1:1", "weight": 0.99,
                                         "regret": 0.0},
                                        {"endpoint": "http://127.0.0.1:2", "weight": 0.01,
                                         "regret": 0.2}]}}}
    frame = Frame(elapsed=3, duration=10, requests=300, errors=0, window=2,
                  pods=[PodLine("pod-0", 0.99, 0.004, 0.009),
                        PodLine("pod-1", 0.01, math.nan, math.nan, bad=True)],
                  states={"client-1": state, "client-2": None}, upstream="demo")
    tty = io.StringIO()
    view = LiveView(tty, tty=True)
    view.show(frame)
    first = tty.getvalue()
    view.show(frame)
    second = tty.getvalue()[len(first):]
    drawn = first.count("\n")
    assert not first.startswith("\x1b[") or first.startswith("\x1b[J")
    assert second.startswith(f"\x1b[{drawn}F\x1b[J")  # back up over the last frame, clear
    assert "w=[0.99 0.01]" in first and "regret=0.2000" in first and "converged" in first
    assert "(no state)" in first and "(bad)" in first
    pipe = io.StringIO()
    LiveView(pipe, tty=False).show(frame)
    line = pipe.getvalue()
    assert line.count("\n") == 1 and "\x1b" not in line
    assert "pod-1*=1.0%" in line and "converged=1/2" in line


def test_live_view_shows_who_follows_the_signaler() -> None:
    import io

    from equilibrium.lab.live import Frame, LiveView, PodLine

    def state(following: bool) -> dict[str, object]:
        return {"upstreams": {"demo": {
            "policy": "equilibrium", "nash_gap": 0.0, "flapping": 0.0, "converged": False,
            "following": following,
            "endpoints": [{"endpoint": "http://127.0.0.1:1", "weight": 1.0, "regret": 0.0}]}}}

    frame = Frame(elapsed=4, duration=10, requests=10, errors=0, window=2,
                  pods=[PodLine("pod-0", 1.0, 0.004, 0.009)],
                  states={"client-1": state(True), "client-2": state(False)}, upstream="demo",
                  extra=["  signaler (embedded Redis): sidecars following 1/2"], signaling=True)
    tty = io.StringIO()
    LiveView(tty, tty=True).show(frame)
    rows = tty.getvalue().splitlines()
    assert any("client-1" in r and r.endswith("follows signaler") for r in rows)
    assert any("client-2" in r and r.endswith("local regret matching (fallback)") for r in rows)
    assert any("1/2 follow the signaler" in r for r in rows)
    pipe = io.StringIO()
    LiveView(pipe, tty=False).show(frame)
    assert "following=1/2" in pipe.getvalue() and "signaler (embedded Redis)" in pipe.getvalue()
