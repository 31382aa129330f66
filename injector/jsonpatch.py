"""RFC 6902 JSON Patch operations for the injector, with RFC 6901 pointer escaping.

Owns how additions to a pod are expressed so that they apply to any pod: a list or map that
does not exist yet is added whole; one that exists is appended to (``/-``) or given new keys.
Pure functions; the patch is a list of ``PatchOperation`` dicts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypedDict


class PatchOperation(TypedDict):
    """One RFC 6902 ``add`` operation (the only kind the injector emits)."""

    op: Literal["add"]
    path: str
    value: Any


def escape_pointer_token(token: str) -> str:
    """RFC 6901: ``~`` becomes ``~0`` and ``/`` becomes ``~1`` (in that order)."""
    return token.replace("~", "~0").replace("/", "~1")


def pointer(*tokens: str) -> str:
    """A JSON Pointer from unescaped tokens: ``pointer("metadata", "annotations", "a/b")``."""
    return "".join("/" + escape_pointer_token(t) for t in tokens)


def append_items(parent: Mapping[str, Any], key: str, items: Sequence[Any],
                 base: tuple[str, ...]) -> list[PatchOperation]:
    """Append ``items`` to the list ``parent[key]`` (at pointer ``base``), creating it if absent.

    A missing or null list is added whole: ``/-`` on a missing array is invalid JSON Patch.
    """
    if not items:
        return []
    path = pointer(*base, key)
    if not isinstance(parent.get(key), list):
        return [{"op": "add", "path": path, "value": list(items)}]
    return [{"op": "add", "path": path + "/-", "value": item} for item in items]


def set_entries(parent: Mapping[str, Any], key: str, entries: Mapping[str, str],
                base: tuple[str, ...]) -> list[PatchOperation]:
    """Add ``entries`` to the map ``parent[key]`` (at ``base``), creating the map if absent.

    ``add`` on an existing key replaces its value (RFC 6902 4.1), so the result is the same
    whether or not the key was there.
    """
    if not entries:
        return []
    current = parent.get(key)
    if not isinstance(current, Mapping):
        return [{"op": "add", "path": pointer(*base, key), "value": dict(entries)}]
    return [{"op": "add", "path": pointer(*base, key, name), "value": value}
            for name, value in entries.items()]
