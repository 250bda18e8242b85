"""What the device records of each frame it sends: a FrameRecord, and the JSON object it is written as.

The device writes one per frame (`splitleak device --json FILE` under "frames", `--records FILE` one a line); the
run's summary (splitleak.core.metrics), the sweep and the demo read them back. The JSON names are the fields' names,
in the order the device has always written them, so files written before this type existed load as they are, and the
demo's page (demo/static/demo.js) reads the same names.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

# The stages a frame's latency is timed in, in the order they happen; "total" is from the device beginning on the frame
# to the answer's arrival, so it also holds the moments between the stages (handing over between threads, queues).
STAGES = ("preprocess", "head", "defence", "encode", "uplink", "cloud", "downlink", "total")
# From a cloud that reports no times (a stock OIP server such as Triton), uplink, cloud and downlink are one stage.
NETWORK_CLOUD = "network + cloud"
# Every stage a record may have, in the order a summary lists them.
ALL_STAGES = (*STAGES[:-1], NETWORK_CLOUD, STAGES[-1])
# The fields the cloud's answer fills in.
ANSWER = ("prediction", "bytes_down", "end_ns", "uplink_ms", "cloud_ms", "downlink_ms", "total_ms", "network_cloud_ms")
# What only a run with a break or a stop has: left out of the JSON at their defaults, so that a run without either
# writes what the device always wrote.
MISHAP = {"resent": 0, "unanswered": False}


@dataclass(frozen=True, kw_only=True)
class FrameRecord:
    """One frame the device sent and what came back. `_ns`: wall clock in ns since the epoch; `_ms`: milliseconds.

    Uplink and downlink compare the device's and the cloud's wall clocks (see splitleak.device.client)."""

    # Known when the frame leaves the device.
    frame: int  # its frame id: its index in the data set's test split, or past it a train image (splitleak.core.data)
    label: int  # its true class; -1 when the data set's classes are not the model's
    split: str  # the split point it went through
    link: str  # the link profile's name
    defence: str  # the run-time defence applied to its activation
    strength: float  # the defence's strength
    start_ns: int  # when the device began on it
    error: str | None = None  # why the cloud refused it; None when it answered (or never did: see unanswered)
    preprocess_ms: float  # resizing and normalising the picture
    head_ms: float  # ONNX Runtime running the head
    defence_ms: float  # the defence's transform
    encode_ms: float  # serialising the request
    bytes_up: int  # the request, serialised
    device_send_ns: int  # when it was handed to the link; sent in the request too, so the cloud and a tap see it
    # Known when the answer is back; None when the cloud refused the frame (and left out of its JSON).
    prediction: int | None = None  # the class the cloud gave it
    bytes_down: int | None = None  # the answer, serialised
    end_ns: int | None = None  # when the answer arrived
    uplink_ms: float | None = None  # from device_send_ns until the cloud received the request
    cloud_ms: float | None = None  # the cloud's own time: restoring the activation and running the tail
    downlink_ms: float | None = None  # from the cloud sending the answer until it arrived
    total_ms: float | None = None  # from start_ns to end_ns
    network_cloud_ms: float | None = None  # with no times from the cloud: from device_send_ns until the answer arrived
    # Known when the run ends.
    resent: int = 0  # times it was sent again after the stream to the cloud broke (device_send_ns is the last time)
    unanswered: bool = False  # the run ended (failed or stopped) before any answer came

    def stages_ms(self) -> dict[str, float]:
        """Each stage's time, by its name in STAGES; only the device's own stages when the cloud refused the frame."""
        stages = {
            "preprocess": self.preprocess_ms,
            "head": self.head_ms,
            "defence": self.defence_ms,
            "encode": self.encode_ms,
            "uplink": self.uplink_ms,
            "cloud": self.cloud_ms,
            "downlink": self.downlink_ms,
            NETWORK_CLOUD: self.network_cloud_ms,
            "total": self.total_ms,
        }
        return {stage: ms for stage, ms in stages.items() if ms is not None}

    def to_json(self) -> dict:
        """The JSON object the device writes: every field by its name, the answer's left out on a refused or
        unanswered frame, `resent` and `unanswered` left out at their defaults."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if not ((f.name in ANSWER and value is None) or (f.name in MISHAP and value == MISHAP[f.name])):
                out[f.name] = value
        return out

    @classmethod
    def from_json(cls, obj: dict) -> FrameRecord:
        """A record from the JSON object the device wrote (or wrote before this type existed: the same names)."""
        return cls(**{f.name: obj[f.name] for f in fields(cls) if f.name in obj})
