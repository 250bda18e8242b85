"""The link model: how long a message takes to cross the network between the phone and the cloud.

A message of `n` bytes that is handed to the link at time `t` starts transmitting when the link is free (messages
queue behind each other, first in first out), takes `8 n / bandwidth` to transmit, and arrives half a round trip
(plus jitter) after its last bit left. The same model holds each way, one `Link` per direction. Messages arrive in
order, as on a TCP connection.

The named profiles are assumptions, not measurements: the uplink rates are the averages Neurosurgeon measured on
phones (Kang et al., ASPLOS 2017, Section 3: 3G 1.1 Mbit/s, LTE 5.85 Mbit/s, Wi-Fi 18.88 Mbit/s), 5G is a typical
mid-band uplink, and the round-trip times are typical figures for each kind of network. One bandwidth serves both
directions, a simplification that favours the downlink's small replies not at all (they are a few dozen bytes).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass


@dataclass(frozen=True)
class LinkProfile:
    name: str
    bandwidth_mbps: float  # megabits per second; math.inf for no limit
    rtt_ms: float
    jitter_ms: float = 0.0  # standard deviation of the one-way delay

    def transmit_s(self, nbytes: int) -> float:
        return 0.0 if math.isinf(self.bandwidth_mbps) else nbytes * 8 / (self.bandwidth_mbps * 1e6)

    def describe(self) -> str:
        if math.isinf(self.bandwidth_mbps) and self.rtt_ms == 0:
            return f"{self.name} (no simulated delay)"
        return f"{self.name} ({self.bandwidth_mbps:g} Mbit/s, RTT {self.rtt_ms:g} ms, jitter {self.jitter_ms:g} ms)"


PROFILES: dict[str, LinkProfile] = {
    "loopback": LinkProfile("loopback", math.inf, 0.0),
    "wifi": LinkProfile("wifi", 18.88, 10.0, 1.0),
    "5g": LinkProfile("5g", 50.0, 20.0, 2.0),
    "4g": LinkProfile("4g", 5.85, 50.0, 5.0),
    "3g": LinkProfile("3g", 1.1, 100.0, 10.0),
}


def profile(
    name: str = "loopback",
    *,
    bandwidth_mbps: float | None = None,
    rtt_ms: float | None = None,
    jitter_ms: float | None = None,
) -> LinkProfile:
    """A named profile, with any of its three numbers overridden."""
    if name not in PROFILES:
        raise KeyError(f"unknown link profile {name!r}; profiles: {', '.join(PROFILES)}")
    base = PROFILES[name]
    overridden = (bandwidth_mbps, rtt_ms, jitter_ms) != (None, None, None)
    return LinkProfile(
        "custom" if overridden else name,
        base.bandwidth_mbps if bandwidth_mbps is None else bandwidth_mbps,
        base.rtt_ms if rtt_ms is None else rtt_ms,
        base.jitter_ms if jitter_ms is None else jitter_ms,
    )


class Link:
    """One direction of a link: turns (size, time handed over) into time of arrival. Times are in seconds."""

    def __init__(self, profile: LinkProfile, seed: int = 0) -> None:
        self.profile = profile
        self._free_at = -math.inf
        self._last_arrival = -math.inf
        self._rng = random.Random(seed)

    def arrival(self, nbytes: int, sent_at: float) -> float:
        start = max(sent_at, self._free_at)
        self._free_at = start + self.profile.transmit_s(nbytes)
        propagation = self.profile.rtt_ms / 2 + self._rng.gauss(0.0, self.profile.jitter_ms)
        self._last_arrival = max(self._free_at + max(propagation, 0.0) / 1e3, self._last_arrival)
        return self._last_arrival
