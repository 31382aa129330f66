"""List the requirements a wheelhouse is missing for ANOTHER interpreter (the image's).

Missing means: no wheel of that project, or none whose version satisfies the specifier.

`pip download --python-version` picks wheel tags for the target but evaluates environment
markers against the host (e.g. redis needs ``async-timeout; python_full_version < "3.11.3"``:
true for bookworm's 3.11.2, false for a 3.11.7 host). This script reads every wheel's
``Requires-Dist``, evaluates the markers with the target's environment (a JSON object of PEP 508
marker variables, as printed by ``MARKER_ENV_SNIPPET`` inside the image) and prints, one per
line, each requirement no wheel in the folder satisfies. build.sh downloads those and repeats
until nothing is missing, so a warm wheelhouse needs no network at all.

Extras count: each ROOT requirement (e.g. ``equilibrium-mesh[lab]``, for the lab image) and each
requirement with extras that a wheel here has (``foo[bar]``) makes the ``extra == "bar"``
requirements of that project needed too, until nothing new is asked for.

usage: complete_wheelhouse.py WHEELHOUSE TARGET_ENV_JSON [ROOT_REQUIREMENT...]
"""

from __future__ import annotations

import json
import sys
import zipfile
from email.parser import Parser
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

# Runs inside the target image with only the standard library (PEP 508 marker variables).
MARKER_ENV_SNIPPET = """
import json, os, platform, sys
v = sys.implementation.version
print(json.dumps({
    "implementation_name": sys.implementation.name,
    "implementation_version": f"{v.major}.{v.minor}.{v.micro}",
    "os_name": os.name, "platform_machine": platform.machine(),
    "platform_release": platform.release(), "platform_system": platform.system(),
    "platform_version": platform.version(),
    "python_full_version": platform.python_version(),
    "platform_python_implementation": platform.python_implementation(),
    "python_version": ".".join(platform.python_version_tuple()[:2]),
    "sys_platform": sys.platform}))
"""


def _requires(wheel: Path) -> list[Requirement]:
    with zipfile.ZipFile(wheel) as archive:
        meta_name = next(n for n in archive.namelist()
                         if n.endswith(".dist-info/METADATA") and n.count("/") == 1)
        metadata = Parser().parsestr(archive.read(meta_name).decode("utf-8"))
    return [Requirement(line) for line in metadata.get_all("Requires-Dist") or []]


def _active(req: Requirement, target_env: dict[str, str], extras: set[str]) -> bool:
    """Whether ``req`` applies on the target when its project is installed with ``extras``."""
    if req.marker is None:
        return True
    return any(req.marker.evaluate({**target_env, "extra": extra}) for extra in {"", *extras})


def missing_requirements(wheelhouse: Path, target_env: dict[str, str],
                         roots: list[str] | tuple[str, ...] = ()) -> list[str]:
    """Requirements (as strings) needed on the target whose project has no wheel here.

    Every wheel in the folder is needed with the extras asked of it, and so is each of ``roots``.
    """
    have: dict[str, list[Version]] = {}
    requires: dict[str, list[Requirement]] = {}
    for wheel in sorted(wheelhouse.glob("*.whl")):
        name, version, _, _ = parse_wheel_filename(wheel.name)
        have.setdefault(name, []).append(version)
        requires.setdefault(name, []).extend(_requires(wheel))
    root_reqs = [Requirement(root) for root in roots]
    extras: dict[str, set[str]] = {}
    for req in root_reqs:
        extras.setdefault(canonicalize_name(req.name), set()).update(req.extras)
    changed = True
    while changed:  # each pass adds extras; there are finitely many, so it ends
        changed = False
        for name, reqs in requires.items():
            for req in reqs:
                if not req.extras or not _active(req, target_env, extras.get(name, set())):
                    continue
                asked = extras.setdefault(canonicalize_name(req.name), set())
                if not req.extras <= asked:
                    asked.update(req.extras)
                    changed = True
    needed = list(root_reqs)
    for name, reqs in requires.items():
        needed.extend(r for r in reqs if _active(r, target_env, extras.get(name, set())))
    missing: dict[str, str] = {}
    for req in needed:
        name = canonicalize_name(req.name)
        if not any(req.specifier.contains(v, prereleases=True) for v in have.get(name, [])):
            missing[name] = f"{req.name}{req.specifier}"
    return sorted(missing.values())


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(__doc__.strip().splitlines()[-1], file=sys.stderr)
        return 2
    for requirement in missing_requirements(Path(argv[0]), json.loads(argv[1]), argv[2:]):
        print(requirement)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
