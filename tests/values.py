"""Hypothesis strategies for hostile values: what a database column and an API answer can hold."""

from __future__ import annotations

from decimal import Decimal

from hypothesis import strategies as st

# Every code point, unpaired surrogates and NUL included (st.text() leaves surrogates out).
any_text = st.text(st.characters(exclude_categories=()), max_size=40)
hostile_text = st.one_of(
    any_text,
    st.sampled_from(["\x00", "a\x00b", "\ud800", "a\udcffb", "\x1b[31m", " \t\n "]),
    st.text(min_size=250, max_size=300),
)

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)

# The Python values psycopg (and sqlite3) return for the column types a key, euid or contact
# column could have: text and varchar (str; bytes from a SQL_ASCII database), integers (int),
# numeric (Decimal, NaN and infinities included), real and double precision (float), boolean,
# bytea, date and time types, uuid, json and jsonb (decoded), arrays (lists), inet.
column_value = st.one_of(
    st.none(),
    hostile_text,
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(),
    st.decimals(),
    st.sampled_from(
        [
            Decimal("1e30"),
            Decimal("Infinity"),
            Decimal("-Infinity"),
            Decimal("NaN"),
            Decimal("sNaN"),
            Decimal("1E+100000"),
            Decimal("1E-100000"),
            Decimal("8613900000001.000"),
            8613900000001.0,
            float("nan"),
        ]
    ),
    st.binary(max_size=20),
    st.dates(),
    st.datetimes(),
    st.times(),
    st.timedeltas(),
    st.uuids(),
    _json,
    st.lists(st.integers(), max_size=3),
    st.ip_addresses(),
)

# Values a real user's contact could have, for checks that they never leak.
emails = st.emails()
phones = st.from_regex(r"\+?[1-9][0-9]{7,14}", fullmatch=True)
