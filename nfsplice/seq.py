"""TCP sequence-number arithmetic, modulo 2**32 (RFC 9293 section 3.4).

Every comparison or difference of sequence numbers in nfsplice goes through here, so
wrap-around is handled in one place.  `diff(a, b)` is the signed distance from b to a,
valid while the two are less than 2**31 apart (RFC 1982 serial-number arithmetic).
"""
MOD = 1 << 32
MASK = MOD - 1
HALF = 1 << 31


def add(a: int, n: int) -> int:
    """a + n modulo 2**32 (n may be negative)."""
    return (a + n) & MASK


def diff(a: int, b: int) -> int:
    """Signed a - b in [-2**31, 2**31)."""
    d = (a - b) & MASK
    return d - MOD if d >= HALF else d


def lt(a: int, b: int) -> bool:
    return diff(a, b) < 0


def le(a: int, b: int) -> bool:
    return diff(a, b) <= 0


def gt(a: int, b: int) -> bool:
    return diff(a, b) > 0


def ge(a: int, b: int) -> bool:
    return diff(a, b) >= 0


def max_(a: int, b: int) -> int:
    return a if diff(a, b) >= 0 else b


def between(a: int, lo: int, hi: int) -> bool:
    """lo <= a < hi on the circle (an empty range when lo == hi)."""
    return (a - lo) & MASK < (hi - lo) & MASK
