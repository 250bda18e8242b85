"""The sweep's rows: one per configuration and link."""

from __future__ import annotations

# The stages a frame's latency is made of, in the order they happen; their sum is the row's total.
LATENCY_STAGES = ("device", "uplink", "cloud", "downlink", "transport")
