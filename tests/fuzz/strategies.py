"""Hostile inputs for the fuzzers: text that looks almost right.

Random text alone rarely gets past a parser's first check, so these strategies mix the
grammar of the real values (``key=value;...`` fields, base64url signatures, decimal numbers)
with the characters and sizes attackers use: non-ASCII digits (``²``, ``٣``), signs, exponents,
``nan``/``inf``, huge numbers, control characters, separators in the wrong places, empty and
oversized values.
"""

from __future__ import annotations

from hypothesis import strategies as st

DIGITS = "0123456789"
ODD_DIGITS = "²³¹٣۵߂०১੩૪୫௬౭೮൯๑໒༣၄႕០᠑"
ODD_CHARS = "\x00\t\r\n\x7f \u00a0\u2028\ufeff\ud7ff;=,:\"'\\/%+-.eE_"


def numbers() -> st.SearchStrategy[str]:
    """Number-ish text: plain, signed, with exponents, huge, non-ASCII, or special."""
    return st.one_of(
        st.integers(min_value=-(10**30), max_value=10**30).map(str),
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.text(alphabet=DIGITS + ODD_DIGITS + ".-+eE_", min_size=0, max_size=12),
        st.integers(min_value=19, max_value=6_000).map(lambda n: "9" * n),
        st.sampled_from(["nan", "NaN", "inf", "-inf", "Infinity", "1e309", "0x10", "1_000",
                         "", " 1", "1 ", "٣", "²", "-0", "+1", "1.", ".5"]),
    )


def words() -> st.SearchStrategy[str]:
    """Short tokens: names, versions, phases, ids; some with odd characters."""
    return st.one_of(
        st.sampled_from(["v=1", "v=2", "v=", "v=01", "id", "ts", "sig", "score", "level",
                         "phase", "retry", "good", "punished", "forgiving", "anonymous",
                         "price", "bid", "load", "limit", "queue", "sidecar", "upstream"]),
        st.text(alphabet=st.characters(codec="ascii"), max_size=12),
        st.text(max_size=6),
        st.text(alphabet=ODD_CHARS, max_size=4),
    )


def field_lists() -> st.SearchStrategy[str]:
    """``k=v;k=v`` style header values with hostile keys, values and separators."""
    pair = st.tuples(words(), st.sampled_from(["=", "", "==", ":"]),
                     st.one_of(numbers(), words(), base64ish()))
    return st.builds(
        lambda pairs, sep, lead: lead + sep.join(k + eq + v for k, eq, v in pairs),
        st.lists(pair, max_size=8), st.sampled_from([";", ",", "; ", ";;", " "]),
        st.sampled_from(["", "v=1;", "v=2;", "v=1", ";"]),
    )


def base64ish() -> st.SearchStrategy[str]:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_+/="
    return st.one_of(st.text(alphabet=alphabet, min_size=40, max_size=46),
                     st.text(alphabet=alphabet, max_size=60))


def header_values() -> st.SearchStrategy[str]:
    """Anything a header value might carry, grammar-shaped or not, up to a few KiB."""
    return st.one_of(
        field_lists(), numbers(), words(), st.text(max_size=64),
        st.text(alphabet=st.characters(codec="latin-1"), max_size=64),
        st.integers(min_value=1, max_value=9_000).map(lambda n: "a" * n),
    )
