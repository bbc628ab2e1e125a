"""Reservation ids: sealed subject tags that round-trip, cannot be altered, and ids made by
earlier versions (sealed with HMAC-SHA256) still read."""

from __future__ import annotations

import pytest

from ratelimitd.quota.ids import ReservationIds

SECRET = b"k" * 32
# made by the earlier sealing (HMAC-SHA256 keystream and tag) under SECRET
EARLIER = {
    "rsv_AAAAAAAAAAAAAAAAAAAAAAAA.JCcu693hVZBzpIiqjSE_Bkc": ("A" * 24, "user:u1"),
    "rsv_BBBBBBBBBBBBBBBBBBBBBBBB.jeksxAbN_nQeGob50rpsyq8rVzB6qZFGnwoZsvyMJwwARs90MH2cG9sjuI0RIAP"
    "kxalav3GtHO10qvpoGmYBP-d3IH1q2F0h31TYu-gizh4gb9T6HQ": ("B" * 24, "user:" + "x" * 70),
}


@pytest.mark.parametrize("tag", ["user:u1", "org:" + "é" * 90, "ip_prefix:2001:db8::/64"])
def test_an_id_round_trips_and_hides_its_tag(tag: str) -> None:
    ids = ReservationIds(SECRET)
    rand = ids.random()
    rid = ids.make(tag, rand)
    assert ids.parse(rid) == (rand, tag)
    assert tag not in rid and ReservationIds(b"j" * 32).parse(rid) is None


def test_an_altered_id_is_nobodys() -> None:
    ids = ReservationIds(SECRET)
    rid = ids.make("user:u1", ids.random())
    for i in range(rid.index(".") + 1, len(rid) - 1):  # the last character: see test_settle
        altered = rid[:i] + ("A" if rid[i] != "A" else "B") + rid[i + 1:]
        assert ids.parse(altered) is None, altered


@pytest.mark.parametrize("rid", list(EARLIER))
def test_ids_sealed_by_earlier_versions_still_read(rid: str) -> None:
    assert ReservationIds(SECRET).parse(rid) == EARLIER[rid]
    assert ReservationIds(b"j" * 32).parse(rid) is None
