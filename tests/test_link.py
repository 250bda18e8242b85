"""The link model: size over bandwidth plus half the round trip, first in first out, each way."""

import math

import pytest

from splitleak.core import link


def test_a_message_takes_its_size_over_the_bandwidth_plus_half_the_round_trip():
    profile = link.LinkProfile("t", bandwidth_mbps=8.0, rtt_ms=40.0)  # 1 byte per microsecond
    assert link.Link(profile).arrival(10_000, sent_at=5.0) == pytest.approx(5.0 + 0.010 + 0.020)


def test_messages_queue_behind_each_other_on_a_busy_link():
    uplink = link.Link(link.LinkProfile("t", bandwidth_mbps=8.0, rtt_ms=0.0))
    first = uplink.arrival(1_000_000, sent_at=0.0)  # 1 s on the wire
    second = uplink.arrival(1_000_000, sent_at=0.1)  # handed over while the first is still transmitting
    assert first == pytest.approx(1.0) and second == pytest.approx(2.0)


def test_jittered_messages_still_arrive_in_order():
    uplink = link.Link(link.LinkProfile("t", bandwidth_mbps=math.inf, rtt_ms=20.0, jitter_ms=30.0), seed=1)
    arrivals = [uplink.arrival(100, sent_at=i * 0.001) for i in range(200)]
    assert arrivals == sorted(arrivals)
    assert all(arrival >= i * 0.001 for i, arrival in enumerate(arrivals))


def test_loopback_adds_no_delay_and_overrides_make_a_custom_profile():
    assert link.Link(link.PROFILES["loopback"]).arrival(10**9, sent_at=3.0) == 3.0
    custom = link.profile("4g", rtt_ms=10.0)
    assert custom.name == "custom" and custom.bandwidth_mbps == 5.85 and custom.rtt_ms == 10.0
    with pytest.raises(KeyError, match="profiles: loopback"):
        link.profile("6g")
