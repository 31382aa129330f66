"""A pod that hangs: the GETs it holds are answered by the others once it is ejected, and
nothing with a body or a non-idempotent method is ever sent twice (sidecar/rescue.py).

Real aiohttp pods on loopback, one of which stops answering mid-run; the real sidecar process
with its default policy (``equilibrium``) and ``--rescue``, whose tick ejects the hung pod and
rescues what it holds.
"""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
from aiohttp import web

from tests.integration.procs import async_start_sidecar, async_stop, start_backend


async def test_what_a_hung_pod_holds_is_answered_elsewhere_and_posts_are_not_resent() -> None:
    hung = asyncio.Event()
    heal = asyncio.Event()

    async def hangs(request: web.Request) -> web.StreamResponse:
        if hung.is_set():
            await heal.wait()
        return web.Response(text="pod-2", headers={"X-Backend": "pod-2"})

    pods = [await start_backend(f"pod-{i}") for i in range(2)]
    pods.append(await start_backend("pod-2", handler=hangs))
    sidecar = await async_start_sidecar({"svc": [p.url for p in pods]},
                                        extra_args=["--request-timeout", "6", "--rescue"])
    answers: dict[str, int] = {}
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as client:

            async def send(method: str, path: str) -> None:
                async with client.request(method, f"{sidecar.outbound_url}{path}",
                                          headers={"Host": "svc"}) as resp:
                    await resp.read()
                    answers[path] = resp.status

            for i in range(60):  # every pod measured
                await send("GET", f"/warm/{i}")
            hung.set()
            calls = []
            for i in range(60):  # 30 a second, a POST every fourth
                method = "POST" if i % 4 == 3 else "GET"
                calls.append(asyncio.ensure_future(send(method, f"/{method.lower()}/{i}")))
                await asyncio.sleep(1 / 30)
            await asyncio.gather(*calls)
        seen: Counter[str] = Counter(r.path for p in pods for r in p.seen)
        held = [r for r in pods[2].seen if not r.path.startswith("/warm/")]
        held_gets = [r.path for r in held if r.method == "GET"]
        assert held_gets, "no GET reached the hung pod: nothing was tested"
        gets = [path for path in answers if path.startswith("/get/")]
        assert all(answers[path] == 200 for path in gets), {
            path: answers[path] for path in gets if answers[path] != 200}
        # each GET the hung pod held was sent once more, to another pod
        assert all(seen[path] == 2 for path in held_gets)
        assert sidecar.metric("equilibrium_rescued_total", upstream="svc") == len(held_gets)
        # and each is in the hung pod's own series (a stranger found it in none)
        assert sidecar.metric("equilibrium_requests_total", upstream="svc",
                              endpoint=pods[2].url, code="rescued") == len(held_gets)
        # a POST is never sent twice: the ones the hung pod held timed out
        posts = [path for path in answers if path.startswith("/post/")]
        assert all(seen[path] == 1 for path in posts)
        assert all(answers[r.path] == 504 for r in held if r.method == "POST")
    finally:
        heal.set()
        assert await async_stop(sidecar) == 0
        for pod in pods:
            await pod.stop()
