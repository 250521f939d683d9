"""nfsplice.seq: sequence-number arithmetic modulo 2**32 (RFC 9293 3.4, RFC 1982)."""
from __future__ import annotations

import pytest
from hypothesis import given, strategies as st

from nfsplice import seq

MOD = 1 << 32
HALF = 1 << 31
MASK = MOD - 1

u32 = st.integers(0, MASK)
# Sequence numbers near the wrap point are where the bugs live; mix them in.
near_wrap = st.one_of(st.integers(0, 1000), st.integers(MOD - 1000, MASK),
                      st.integers(HALF - 1000, HALF + 1000))
seqs = st.one_of(u32, near_wrap)
# Signed distances that serial-number arithmetic can represent: |n| < 2**31.
dists = st.one_of(st.integers(-(HALF - 1), HALF - 1), st.integers(-1000, 1000),
                  st.sampled_from([-(HALF - 1), HALF - 1, -1, 0, 1]))


def test_constants():
    assert seq.MOD == MOD
    assert seq.MASK == MASK
    assert seq.HALF == HALF


@pytest.mark.parametrize("a, n, want", [
    (0, 0, 0),
    (MASK, 1, 0),
    (MASK, 2, 1),
    (0, -1, MASK),
    (5, -10, MOD - 5),
    (10, MOD, 10),
    (10, -MOD, 10),
    (HALF, HALF, 0),
    (1, 3 * MOD + 2, 3),
])
def test_add_examples(a, n, want):
    assert seq.add(a, n) == want


@pytest.mark.parametrize("a, b, want", [
    (0, 0, 0),
    (1, 0, 1),
    (0, 1, -1),
    (0, MASK, 1),            # 0 is one past 2**32 - 1
    (MASK, 0, -1),
    (5, MOD - 5, 10),
    (MOD - 5, 5, -10),
    (HALF - 1, 0, HALF - 1),
    (HALF, 0, -HALF),        # exactly half-way: defined as the negative end
    (0, HALF, -HALF),
    (HALF + 1, 0, -(HALF - 1)),
])
def test_diff_examples(a, b, want):
    assert seq.diff(a, b) == want


@pytest.mark.parametrize("a, b", [(0, 1), (MASK, 0), (MOD - 100, 100), (HALF - 1, HALF),
                                  (HALF, HALF + 1), (MASK - 1, MASK)])
def test_comparisons_examples(a, b):
    assert seq.lt(a, b) and seq.le(a, b)
    assert not seq.gt(a, b) and not seq.ge(a, b)
    assert seq.gt(b, a) and seq.ge(b, a)
    assert not seq.lt(b, a) and not seq.le(b, a)
    assert seq.max_(a, b) == b and seq.max_(b, a) == b


def test_comparisons_equal():
    for a in (0, 1, HALF, MASK):
        assert seq.le(a, a) and seq.ge(a, a)
        assert not seq.lt(a, a) and not seq.gt(a, a)
        assert seq.max_(a, a) == a


@given(seqs, st.integers(-10 * MOD, 10 * MOD))
def test_add_in_range_and_modular(a, n):
    r = seq.add(a, n)
    assert 0 <= r <= MASK
    assert r == (a + n) % MOD
    assert seq.add(r, -n) == a


@given(seqs, dists)
def test_diff_inverts_add(a, n):
    assert seq.diff(seq.add(a, n), a) == n
    assert seq.diff(a, seq.add(a, n)) == -n


@given(seqs, seqs)
def test_diff_range_and_add_back(a, b):
    d = seq.diff(a, b)
    assert -HALF <= d < HALF
    assert seq.add(b, d) == a
    assert d % MOD == (a - b) % MOD


@given(seqs, seqs)
def test_antisymmetry(a, b):
    d = seq.diff(a, b)
    if d == -HALF:
        # Exactly half-way round: both directions are -2**31 (RFC 1982 leaves it undefined).
        assert seq.diff(b, a) == -HALF
        return
    assert seq.diff(b, a) == -d
    assert seq.lt(a, b) == seq.gt(b, a)
    assert seq.le(a, b) == seq.ge(b, a)
    # Exactly one of <, ==, > holds.
    assert [seq.lt(a, b), a == b, seq.gt(a, b)].count(True) == 1
    assert seq.le(a, b) == (seq.lt(a, b) or a == b)
    assert seq.ge(a, b) == (seq.gt(a, b) or a == b)
    assert seq.max_(a, b) == seq.max_(b, a)


@given(seqs, dists)
def test_comparisons_follow_distance(a, n):
    b = seq.add(a, n)
    assert seq.lt(a, b) == (n > 0)
    assert seq.le(a, b) == (n >= 0)
    assert seq.gt(a, b) == (n < 0)
    assert seq.ge(a, b) == (n <= 0)
    assert seq.max_(a, b) == (b if n > 0 else a)


@given(seqs, seqs)
def test_max_is_one_of_and_upper_bound(a, b):
    m = seq.max_(a, b)
    assert m in (a, b)
    assert seq.ge(m, a) or seq.diff(a, b) == -HALF
    assert seq.ge(m, b)


@given(seqs, st.integers(0, MASK), st.integers(0, MASK))
def test_between_matches_unwrapped(lo, length, k):
    """a = lo + k lies in [lo, lo + length) on the circle iff k < length."""
    hi = seq.add(lo, length)
    a = seq.add(lo, k)
    assert seq.between(a, lo, hi) == (k < length)


@given(seqs, st.integers(0, 2000), st.integers(-2000, 4000))
def test_between_small_windows_near_anything(lo, length, k):
    hi = seq.add(lo, length)
    a = seq.add(lo, k)
    assert seq.between(a, lo, hi) == (0 <= k < length)


@given(seqs, seqs)
def test_between_empty_range(a, lo):
    assert not seq.between(a, lo, lo)


@given(seqs)
def test_between_ends(lo):
    hi = seq.add(lo, 10)
    assert seq.between(lo, lo, hi)
    assert seq.between(seq.add(lo, 9), lo, hi)
    assert not seq.between(hi, lo, hi)
    assert not seq.between(seq.add(lo, -1), lo, hi)


@pytest.mark.parametrize("a, lo, hi, want", [
    (MASK, MOD - 10, 10, True),
    (0, MOD - 10, 10, True),
    (9, MOD - 10, 10, True),
    (10, MOD - 10, 10, False),
    (MOD - 11, MOD - 10, 10, False),
    (MOD - 10, MOD - 10, 10, True),
    (HALF, 0, MASK, True),
    (MASK, 0, MASK, False),
    (5, 10, 5, False),       # the "range" from 10 round to 5 excludes 5...
    (4, 10, 5, True),        # ...but includes everything past 10 and before 5
    (MASK, 10, 5, True),
])
def test_between_examples(a, lo, hi, want):
    assert seq.between(a, lo, hi) is want
