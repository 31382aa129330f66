"""Each reason vocabulary is one enum, and docs/operations.md "Error reasons" lists exactly its
values in its row (the values are metric labels and JSON fields that dashboards match on)."""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path

import pytest

from injector.review import Outcome
from mesh.admission import RejectReason
from sidecar.errors import ErrorReason, HeaderDrop
from sidecar.inbound_policing import InboundOutcome
from sidecar.probe_answer import ProbeResult
from sidecar.transparent import PassthroughFailure
from wire.errors import Reason

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"
VOCABULARIES: list[tuple[str, type[StrEnum]]] = [
    ("sidecar.errors.ErrorReason", ErrorReason),
    ("mesh.admission.RejectReason", RejectReason),
    ("sidecar.inbound_policing.InboundOutcome", InboundOutcome),
    ("wire.errors.Reason", Reason),
    ("sidecar.errors.HeaderDrop", HeaderDrop),
    ("sidecar.transparent.PassthroughFailure", PassthroughFailure),
    ("sidecar.probe_answer.ProbeResult", ProbeResult),
    ("injector.review.Outcome", Outcome),
]


def table_rows() -> dict[str, str]:
    """Enum name -> the values cell of its row in the "Error reasons" table."""
    text = OPERATIONS.read_text()
    section = text.split("## Error reasons\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        found = re.match(r"`([\w.]+)`", cells[0]) if len(cells) == 3 else None
        if found:
            rows[found.group(1)] = cells[2]
    return rows


@pytest.mark.parametrize(("name", "enum"), VOCABULARIES, ids=[n for n, _ in VOCABULARIES])
def test_the_table_lists_exactly_the_values_of_each_vocabulary(name: str,
                                                               enum: type[StrEnum]) -> None:
    cell = table_rows()[name]
    listed = set(re.findall(r"`([^`]+)`", cell)) - {"token-bucket"}  # a mode named in a note
    assert listed == {member.value for member in enum}


def test_every_row_is_a_checked_vocabulary() -> None:
    assert set(table_rows()) == {name for name, _ in VOCABULARIES}

