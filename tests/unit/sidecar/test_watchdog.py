"""The request watchdog: a stall bound that pushes cheaply, and asks before it cuts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from sidecar.watchdog import Watchdog


async def _run(idle: float, work: float, hook: Callable[[], bool] | None = None,
               pushes: int = 0) -> bool:
    """``work`` seconds of waiting under a watchdog (``pushes`` times pushed on the way,
    ``hook`` its progress check); whether it timed out."""
    watchdog = Watchdog(idle)
    watchdog.moving = hook
    try:
        for _ in range(pushes + 1):
            await asyncio.sleep(work / (pushes + 1))
            watchdog.push()
        return False
    except asyncio.CancelledError:
        if not watchdog.took_back():
            raise
        return True
    finally:
        watchdog.stop()


async def _guarded(idle: float, work: float, moving: list[bool] | None = None,
                   pushes: int = 0) -> tuple[bool, int]:
    """:func:`_run` with a check that answers ``moving`` in turn (then no); (timed out?,
    times the check was asked)."""
    asked = 0

    def ask() -> bool:
        nonlocal asked
        asked += 1
        return moving.pop(0) if moving else False

    timed_out = await _run(idle, work, ask if moving is not None else None, pushes)
    return timed_out, asked


async def test_a_stall_past_the_bound_is_cut() -> None:
    assert await _guarded(0.05, 0.5) == (True, 0)


async def test_pushes_within_the_bound_keep_it() -> None:
    assert await _guarded(0.1, 0.4, pushes=9) == (False, 0)


async def test_progress_no_push_saw_keeps_it_as_long_as_it_lasts() -> None:
    # moving says "yes" twice, then "no": the cut comes a bound later each time
    loop = asyncio.get_running_loop()
    started = loop.time()
    timed_out, asked = await _guarded(0.05, 1.0, moving=[True, True, False])
    assert timed_out and asked == 3
    assert loop.time() - started >= 0.15  # three bounds: never sooner


async def test_moving_is_not_asked_while_pushes_come() -> None:
    assert await _guarded(0.1, 0.3, moving=[], pushes=9) == (False, 0)


async def test_a_failing_progress_check_cuts_its_request_and_spares_the_others() -> None:
    # the check runs in the loop's one sweeper timer: an exception there must not stop the
    # timer for every other request
    def broken() -> bool:
        raise TypeError("hook failed")

    assert await asyncio.gather(_run(0.05, 2.0, broken), _run(0.2, 2.0)) == [True, True]


async def test_a_cancellation_of_someone_else_in_the_same_pass_is_not_taken_back() -> None:
    # The review's finding: the stall bound and an app's reset (the listener cancels the
    # request) in one loop pass: took_back() said "the watchdog's", so the reset was handled
    # as a stall (charged to the endpoint) and the other cancellation left pending.
    outcome: list[str] = []
    box: dict[str, Watchdog] = {}

    async def handler() -> None:
        watchdog = box["wd"] = Watchdog(10)
        try:
            await asyncio.sleep(10)  # waiting for the answer
        except asyncio.CancelledError:
            if not watchdog.took_back():
                outcome.append("cancelled")
                raise
            outcome.append("stall")
        finally:
            watchdog.stop()

    task = asyncio.create_task(handler())
    await asyncio.sleep(0.01)

    def same_pass() -> None:
        box["wd"]._expire()  # the sweeper's timer
        task.cancel()  # the listener, for the app's reset

    asyncio.get_running_loop().call_soon(same_pass)
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert outcome == ["cancelled"] and task.cancelled()
