"""`splitleak device --device PROFILE` (or `--cpu-quota F`): the head run as slowly as a class of device runs it.

The profile's slowdown against this host comes from splitleak.core.compute. Where the kernel allows it (`--slow-by
auto` or `kernel`), the whole device process joins a cgroup with 1 / slowdown of one core; where it does not (`auto`
falls back, `kernel` fails) or when asked (`model`), the time model holds each head until its predicted time has
passed. What ran is said on stdout and in `--json` under "compute".

The kernel rations CPU time per period, at least 1 ms of it: a frame whose work fits in what is left of the period's
quota runs at full speed, so the kernel's slowdown holds for work sustained over several periods (a busy device, a
bigger model), and the time model's for each frame (docs/device-profiles.md measures both).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from splitleak.core import compute
from splitleak.device.head import TimeModel

SLOW_BY = ("auto", "kernel", "model")


@dataclass
class Compute:
    """How this device run is slowed: by the kernel (`quota`), by the time model (`time_model`), or not at all."""

    profile: str
    slowdown: float
    by: str  # "kernel", "model" or "none"
    detail: str
    host_gmacs: float | None = None
    kernel_refused: str | None = None  # why the kernel could not, when the time model stood in
    quota: compute.CpuQuota | None = None
    time_model: TimeModel | None = None
    throttled: dict = field(default_factory=dict)

    def describe(self) -> str:
        if self.by == "none":
            return "compute: this host's speed (no device profile)"
        fallback = f" (the kernel refused: {self.kernel_refused})" if self.kernel_refused else ""
        return f"compute: {self.profile}, {self.slowdown:.1f}x slower than this host, by {self.detail}{fallback}"

    def close(self) -> None:
        if self.quota is not None:
            self.throttled = self.quota.throttled()
            self.quota.close()
            self.quota = None

    def to_json(self) -> dict:
        keys = ("profile", "slowdown", "by", "detail", "host_gmacs", "kernel_refused", "throttled")
        return {key: getattr(self, key) for key in keys}


def setup(model_dir: Path, device: str | None, cpu_quota: float | None, slow_by: str) -> Compute:
    """Work out the slowdown and start enforcing it (call `close` when done). ValueError for settings that cannot be
    met; QuotaUnavailable when `slow_by` is "kernel" and the kernel refuses."""
    if device is None and cpu_quota is None:
        return Compute("host", 1.0, "none", "nothing")
    calibration = compute.calibrate(model_dir)
    if cpu_quota is not None:
        profile, slowdown = "custom", 1 / cpu_quota
    else:
        profile, slowdown = device, compute.PROFILES[device].slowdown(calibration.host_gmacs)
    if slowdown <= 1:
        return Compute(profile, 1.0, "none", "nothing: as fast as this host or faster", calibration.host_gmacs)
    refused = None
    if slow_by in ("auto", "kernel"):
        try:
            quota = compute.CpuQuota(1 / slowdown)
        except compute.QuotaUnavailable as e:
            if slow_by == "kernel":
                raise
            refused = str(e)
        else:
            return Compute(profile, slowdown, "kernel", quota.describe(), calibration.host_gmacs, quota=quota)
    time_model = TimeModel(calibration.head_ms, slowdown)
    detail = f"the time model (each split's head CPU time here x {slowdown:.1f})"
    return Compute(profile, slowdown, "model", detail, calibration.host_gmacs, refused, time_model=time_model)
