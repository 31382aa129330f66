"""Make docs/dashboard.png: the signaler's dashboard during ``equilibrium demo``, headless.

    .venv/bin/python scripts/dashboard_screenshot.py [--after 45] [--out docs/dashboard.png]

Runs the demo (defaults: 5 pods, the last one bad, 3 clients, the embedded Redis and signaler)
for ``--after`` + 15 seconds, opens the ``dashboard:`` address it prints in a headless Chromium
on loopback only (:mod:`equilibrium.lab.headless`), waits ``--after`` seconds of load, saves a
PNG of the whole page, then stops the demo with Ctrl-C (which stops every child).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import signal
import sys
from pathlib import Path

from equilibrium.lab.headless import Chromium


async def main(after: float, out: Path) -> int:
    demo = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "equilibrium", "demo", "--duration", str(after + 15),
        "--no-live", "--out", "/tmp", stdout=asyncio.subprocess.PIPE)
    assert demo.stdout is not None
    try:
        url = None
        async with asyncio.timeout(120):
            while url is None:
                line = (await demo.stdout.readline()).decode()
                if not line:
                    print("the demo ended before printing its dashboard", file=sys.stderr)
                    return 1
                match = re.match(r"dashboard: (\S+)", line)
                url = match.group(1) if match else None
        async with Chromium() as browser:
            page = await browser.new_page()
            await page.open(url)
            await asyncio.sleep(after)
            await page.screenshot(out, width=1280, height=900)
            if page.record.errors:
                print(f"page errors: {page.record.errors}", file=sys.stderr)
                return 1
        print(f"wrote {out} from {url}")
        return 0
    finally:
        if demo.returncode is None:
            demo.send_signal(signal.SIGINT)
            await asyncio.wait_for(demo.wait(), 60)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--after", type=float, default=45.0, help="seconds of load first (45)")
    parser.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    args = parser.parse_args()
    sys.exit(asyncio.run(main(args.after, args.out)))
