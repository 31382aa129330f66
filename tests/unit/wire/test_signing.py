"""wire.signing: the one reader of the mesh key, its strength, and the MAC of signed formats."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

import pytest

from wire.errors import Reason, WireError
from wire.signing import (
    MESH_SECRET_ENV,
    accepted_keys,
    mac,
    read_mesh_key,
    verify_mac,
)

KEY = b"k" * 32


def test_the_key_is_stripped_and_its_source_named_when_it_is_short(tmp_path: Path) -> None:
    env = {MESH_SECRET_ENV: "  0123456789abcdef0123  "}
    assert read_mesh_key(env) == b"0123456789abcdef0123"
    with pytest.raises(WireError, match="environment value is 5 bytes"):
        read_mesh_key({MESH_SECRET_ENV: "short"})
    (tmp_path / "abc").write_bytes(b"abc\n")
    (tmp_path / "abc").chmod(0o400)
    with pytest.raises(WireError, match="key file is 3 bytes"):
        read_mesh_key({}, tmp_path / "abc")


def test_read_mesh_key_env_wins_and_the_file_is_read_only_without_it(tmp_path: Path) -> None:
    key_file = tmp_path / "mesh.key"
    key_file.write_bytes(b"file-key-0123456789abcdef\n")
    key_file.chmod(0o600)
    assert MESH_SECRET_ENV == "EQUILIBRIUM_MESH_SECRET"
    assert read_mesh_key({}, key_file) == b"file-key-0123456789abcdef"
    assert read_mesh_key({}, str(key_file)) == b"file-key-0123456789abcdef"
    env = {MESH_SECRET_ENV: " env-key-0123456789abcdef "}
    assert read_mesh_key(env, key_file) == b"env-key-0123456789abcdef"
    # with the key in the environment a missing file does not matter
    assert read_mesh_key(env, tmp_path / "absent") == b"env-key-0123456789abcdef"
    assert read_mesh_key({}, None) is None  # no key: the caller decides whether that is fatal


def test_read_mesh_key_failures_carry_a_reason(tmp_path: Path) -> None:
    cases: list[tuple[dict[str, str], Path | None, bool, Reason, str]] = [
        ({}, None, True, Reason.NO_KEY, "EQUILIBRIUM_MESH_SECRET"),
        ({}, tmp_path / "absent", False, Reason.UNREADABLE, "cannot read"),
        ({}, tmp_path / "empty", False, Reason.UNREADABLE, "is empty"),
        ({}, tmp_path / "short", False, Reason.WEAK_KEY, "key file is 5 bytes"),
        ({MESH_SECRET_ENV: "short"}, None, False, Reason.WEAK_KEY, "at least 16"),
    ]
    (tmp_path / "empty").write_bytes(b" \n")
    (tmp_path / "short").write_bytes(b"short\n")
    for name in ("empty", "short"):
        (tmp_path / name).chmod(0o400)
    for env, key_file, required, reason, words in cases:
        with pytest.raises(WireError, match=words) as caught:
            read_mesh_key(env, key_file, required=required)
        assert caught.value.reason is reason and caught.value.subject == "mesh key"


def test_accepted_keys_normalises_one_key_or_a_rotation() -> None:
    assert accepted_keys(KEY) == [KEY]
    assert accepted_keys([KEY, bytearray(b"o" * 16)]) == [KEY, b"o" * 16]
    with pytest.raises(WireError) as none:
        accepted_keys([])
    assert none.value.reason is Reason.NO_KEY
    with pytest.raises(WireError) as short:
        accepted_keys([KEY, b"short"])
    assert short.value.reason is Reason.WEAK_KEY


def test_mac_is_unpadded_base64url_hmac_sha256_checked_against_every_key() -> None:
    digest = hmac.new(KEY, b"message", hashlib.sha256).digest()
    sig = mac(KEY, b"message")
    assert sig == base64.urlsafe_b64encode(digest).rstrip(b"=").decode() and len(sig) == 43
    assert verify_mac([b"o" * 32, KEY], b"message", sig)
    assert not verify_mac([b"o" * 32], b"message", sig)
    assert not verify_mac([KEY], b"message!", sig)
    assert not verify_mac([KEY], b"message", "é" * 43)  # non-ASCII never matches, never raises


@pytest.mark.parametrize("blank", ["", " ", "\n\t"])
def test_a_set_but_blank_variable_is_an_error_not_an_unsigned_start(
        tmp_path: Path, blank: str) -> None:
    """A Secret whose key came out empty must not quietly start a sidecar that signs nothing
    (issue 14, #16), nor fall back to some other key file."""
    key_file = tmp_path / "mesh.key"
    key_file.write_bytes(b"file-key-0123456789abcdef")
    key_file.chmod(0o400)
    for file in (None, key_file):
        with pytest.raises(WireError, match="set but blank") as caught:
            read_mesh_key({MESH_SECRET_ENV: blank}, file)
        assert caught.value.reason is Reason.NO_KEY


@pytest.mark.parametrize("key", ["a" * 16, "a" * 64, "0101010101010101", "abcabcabcabcabcabc",
                                 "\u00e9" * 16])
def test_a_low_entropy_key_is_refused(tmp_path: Path, key: str) -> None:
    with pytest.raises(WireError, match="distinct bytes") as caught:
        read_mesh_key({MESH_SECRET_ENV: key})
    assert caught.value.reason is Reason.WEAK_KEY
    key_file = tmp_path / "weak.key"
    key_file.write_text(key)
    key_file.chmod(0o400)
    with pytest.raises(WireError, match="distinct bytes"):
        read_mesh_key({}, key_file)


@pytest.mark.parametrize(("mode", "words"), [
    (0o444, "others have access"), (0o604, "others have access"), (0o401, "others have access"),
    (0o460, "the group may write it"), (0o666, "others have access and the group may write"),
])
def test_a_key_file_others_can_read_is_refused(tmp_path: Path, mode: int, words: str) -> None:
    key_file = tmp_path / "mesh.key"
    key_file.write_bytes(b"file-key-0123456789abcdef")
    key_file.chmod(mode)
    with pytest.raises(WireError, match=words) as caught:
        read_mesh_key({}, key_file)
    assert caught.value.reason is Reason.UNREADABLE and f"{mode:04o}" in str(caught.value)


@pytest.mark.parametrize("mode", [0o400, 0o600, 0o440])
def test_owner_and_group_read_are_accepted(tmp_path: Path, mode: int) -> None:
    key_file = tmp_path / "mesh.key"
    key_file.write_bytes(b"file-key-0123456789abcdef\n")
    key_file.chmod(mode)
    assert read_mesh_key({}, key_file) == b"file-key-0123456789abcdef"
