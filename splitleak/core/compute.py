"""Device compute profiles: how much slower than this host a class of device runs the head, and how that is enforced.

A profile is one published figure: the time a named device takes for one float32 inference of MobileNet v1 1.0 224
(569 million multiply-accumulates, Howard et al. 2017, Table 8) on its CPU, with TensorFlow Lite. That gives the
device's effective rate in GMAC/s. This host's rate is measured on the model's own head at its deepest split (CPU time
of one ONNX Runtime thread, `calibrate`), and the profile's slowdown is host rate / device rate: the device is assumed
to sustain the same rate on this model's layers as on MobileNet's. The sources are in docs/device-profiles.md; they are
assumptions, as the link profiles are (splitleak.core.link).

Two ways to make the device that slow:
- **the kernel**: a cgroup CPU quota of 1 / slowdown of one core (cgroup v1 `cpu.cfs_quota_us`, or v2 `cpu.max`),
  which the device process joins (`CpuQuota`). The kernel lets a group run `quota` µs of CPU per `period` µs, so the
  quota slows the process's *throughput*: a burst of work shorter than the quota (1 ms at the least) that starts
  with the quota unspent runs at full speed. The group is named for the process (`splitleak-PID`) and removed when
  it ends; a group whose process died without removing it (SIGKILL) is removed by the next `CpuQuota`.
- **the time model** (Neurosurgeon's approach, Kang et al., ASPLOS 2017: per-layer times measured, then predicted
  for the device): each head's CPU time measured on this host, times the slowdown. The device holds each frame's head
  until the model's time has passed. Used where the kernel refuses a group (no root, no cpu controller).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from splitleak.core.process import alive

MOBILENET_V1_MACS = 569e6  # multiply-accumulates of MobileNet v1 1.0 224 (Howard et al. 2017, Table 8)
MIN_QUOTA_US = 1000  # the least quota (and period) either cgroup version takes
MAX_PERIOD_US = 1_000_000
GROUP_PREFIX = "splitleak-"


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    mobilenet_ms: float  # the published MobileNet v1 1.0 224 float inference time; 0 for this host itself
    source: str  # where the figure is published

    @property
    def gmacs(self) -> float:
        """The device's effective rate, GMAC/s (inf for the host)."""
        return math.inf if self.mobilenet_ms == 0 else MOBILENET_V1_MACS / self.mobilenet_ms / 1e6

    def describe(self) -> str:
        if math.isinf(self.gmacs):
            return f"{self.name} ({self.source})"
        return f"{self.name} ({self.gmacs:.1f} GMAC/s: MobileNet v1 in {self.mobilenet_ms:g} ms on a {self.source})"

    def slowdown(self, host_gmacs: float) -> float:
        """How many times slower than this host (1 when the device would be as fast or faster)."""
        return max(host_gmacs / self.gmacs, 1.0)


PROFILES: dict[str, DeviceProfile] = {
    "host": DeviceProfile("host", 0.0, "this machine, one ONNX Runtime thread, not slowed"),
    "rpi4": DeviceProfile(
        "rpi4",
        87.0,
        "Raspberry Pi 4 CPU, TensorFlow Lite (TildAlice on dev.to: MobileNet vs EfficientNet-Lite on a Pi 4)",
    ),
    "phone": DeviceProfile(
        "phone", 123.3, "Pixel 2, one big core, TensorFlow Lite (tensorflow.org/lite/performance/benchmarks)"
    ),
    "armv7": DeviceProfile(
        "armv7",
        401.0,
        "Xiaomi Mi 5, 32-bit ARMv7 build, TensorFlow Lite (github.com/hjchen2/PaddleMobile/wiki/benchmark, 2017)",
    ),
}


# The host's side: each head's CPU time on this machine, measured once per model and cached.


@dataclass(frozen=True)
class Calibration:
    """Each split's head on this host: median CPU ms of one run (one ONNX Runtime thread) and its MACs."""

    model: str
    head_ms: dict[str, float]
    macs: dict[str, int]
    reference: str  # the split whose rate stands for the host's: the deepest (most MACs)

    @property
    def host_gmacs(self) -> float:
        return self.macs[self.reference] / self.head_ms[self.reference] / 1e6

    def predict_ms(self, split: str, slowdown: float) -> float:
        """The time model: the head at `split` on a device `slowdown` times slower than this host."""
        return self.head_ms[split] * slowdown


def head_macs(onnx_path: Path) -> int:
    """Multiply-accumulates of one inference: every Conv, Gemm and MatMul, from the graph's inferred shapes."""
    import onnx
    from onnx import numpy_helper, shape_inference

    model = shape_inference.infer_shapes(onnx.load(str(onnx_path)))
    graph = model.graph
    shapes = {
        v.name: [d.dim_value or 1 for d in v.type.tensor_type.shape.dim]
        for v in [*graph.value_info, *graph.input, *graph.output]
    }
    shapes |= {t.name: list(numpy_helper.to_array(t).shape) for t in graph.initializer}
    total = 0
    for node in graph.node:
        if node.op_type == "Conv":
            weight, out = shapes[node.input[1]], shapes[node.output[0]]  # (Cout, Cin/groups, kh, kw), (B, Cout, H, W)
            total += int(np.prod(weight)) * int(np.prod(out[2:]))
        elif node.op_type in ("Gemm", "MatMul"):
            a, out = shapes[node.input[0]], shapes[node.output[0]]
            total += int(np.prod(out)) * a[-1]
    return total


def cpu_ms(run, runs: int = 200, warmup: int = 20) -> float:
    """Median CPU time of `run()` on this thread, ms: what a CPU quota rations, and what other load inflates least."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(runs):
        start = time.thread_time()
        run()
        times.append(time.thread_time() - start)
    return float(np.median(times)) * 1e3


def calibrate(model_dir: Path, runs: int = 200) -> Calibration:
    """Each split's head timed on this host (cached under the cache folder, keyed by the model's files and the CPU)."""
    import onnxruntime as ort

    from splitleak.core import data, manifest

    m = manifest.load(model_dir)
    key = hashlib.sha256((Path(model_dir) / "manifest.json").read_bytes() + _cpu_name().encode()).hexdigest()[:16]
    path = data.cache_dir() / "compute" / f"{m.name}-{key}.json"
    if path.exists():
        return Calibration(**json.loads(path.read_text()))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    x = np.zeros((1, *m.input_shape), np.float32)
    head_ms, macs = {}, {}
    for name, split in m.splits.items():
        session = ort.InferenceSession(str(split.head), options, providers=["CPUExecutionProvider"])
        head_ms[name] = cpu_ms(lambda session=session: session.run(["activation"], {"image": x}), runs)
        macs[name] = head_macs(split.head)
    calibration = Calibration(m.name, head_ms, macs, max(macs, key=macs.get))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(calibration), indent=1))
    return calibration


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


# The kernel's side: a cgroup with a CPU quota.


class QuotaUnavailable(RuntimeError):
    """The kernel will not give this process a CPU quota here: the message says why."""


def cpu_cgroup() -> tuple[Path, str]:
    """(the folder of a cgroup hierarchy with the cpu controller, "v1" or "v2"); QuotaUnavailable if there is none
    this process may write to."""
    if not Path("/proc/self/mounts").exists():
        raise QuotaUnavailable("no /proc/self/mounts: not Linux")
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        _, where, kind, options, *_ = line.split()
        if kind == "cgroup" and "cpu" in options.split(","):
            found.append((Path(where), "v1"))
        elif kind == "cgroup2":
            controllers = Path(where) / "cgroup.controllers"
            if controllers.exists() and "cpu" in controllers.read_text().split():
                found.append((Path(where), "v2"))
    if not found:
        raise QuotaUnavailable("no cgroup hierarchy with the cpu controller is mounted")
    root, version = found[0]
    if not os.access(root, os.W_OK):
        raise QuotaUnavailable(f"cannot create a cgroup under {root} (needs root)")
    return root, version


def quota_us(fraction: float) -> tuple[int, int]:
    """(quota, period) in µs for `fraction` of one core: the least quota the kernel takes, so that the process is
    held back as often as it can be, and the period that gives the fraction (at most 1 s)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"a CPU quota is a fraction of one core, more than 0 and at most 1; got {fraction:g}")
    period = min(round(MIN_QUOTA_US / fraction), MAX_PERIOD_US)
    return max(round(fraction * period), MIN_QUOTA_US), period


def clean_stale(root: Path) -> list[Path]:
    """Remove the groups of splitleak processes that are gone (killed before they could remove their own)."""
    removed = []
    for group in root.glob(f"{GROUP_PREFIX}*"):
        pid = group.name.removeprefix(GROUP_PREFIX)
        if pid.isdigit() and not alive(int(pid)) and not (group / "cgroup.procs").read_text().split():
            with contextlib.suppress(OSError):
                group.rmdir()
                removed.append(group)
    return removed


class CpuQuota:
    """This process (all its threads) in a cgroup of its own with `fraction` of one core, until `close`.

    `CpuQuota(0.2)` raises QuotaUnavailable, with the reason, where the group cannot be made."""

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction
        self.quota_us, self.period_us = quota_us(fraction)
        self.root, self.version = cpu_cgroup()
        self.removed_stale = clean_stale(self.root)
        self.group = self.root / f"{GROUP_PREFIX}{os.getpid()}"
        self._home = self._current_group()
        try:
            if self.version == "v2" and "cpu" not in (self.root / "cgroup.subtree_control").read_text().split():
                (self.root / "cgroup.subtree_control").write_text("+cpu")  # so that a child group has cpu.max
            self.group.mkdir(exist_ok=True)
            if self.version == "v1":
                (self.group / "cpu.cfs_period_us").write_text(str(self.period_us))
                (self.group / "cpu.cfs_quota_us").write_text(str(self.quota_us))
            else:
                (self.group / "cpu.max").write_text(f"{self.quota_us} {self.period_us}")
            (self.group / "cgroup.procs").write_text(str(os.getpid()))
        except OSError as e:
            with contextlib.suppress(OSError):
                self.group.rmdir()
            raise QuotaUnavailable(f"the kernel refused the cgroup {self.group}: {e.strerror or e}") from e

    def describe(self) -> str:
        knobs = "cpu.cfs_quota_us / cpu.cfs_period_us" if self.version == "v1" else "cpu.max"
        return (
            f"a cgroup {self.version} CPU quota of {100 * self.quota_us / self.period_us:.2f}% of one core "
            f"({knobs} {self.quota_us} / {self.period_us} µs, {self.group})"
        )

    def throttled(self) -> dict:
        """The kernel's counters for the group: periods, periods throttled, time throttled (ms)."""
        stat = dict(line.split() for line in (self.group / "cpu.stat").read_text().splitlines())
        if self.version == "v1":
            return {
                "periods": int(stat["nr_periods"]),
                "throttled": int(stat["nr_throttled"]),
                "throttled_ms": int(stat["throttled_time"]) / 1e6,
            }
        return {
            "periods": int(stat["nr_periods"]),
            "throttled": int(stat["nr_throttled"]),
            "throttled_ms": int(stat["throttled_usec"]) / 1e3,
        }

    def close(self) -> None:
        """Move this process back where it was and remove the group."""
        with contextlib.suppress(OSError):
            (self._home / "cgroup.procs").write_text(str(os.getpid()))
        with contextlib.suppress(OSError):
            self.group.rmdir()

    def __enter__(self) -> CpuQuota:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _current_group(self) -> Path:
        """This process's group in the hierarchy, before it joins the new one."""
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            if (self.version == "v1" and "cpu" in controllers.split(",")) or (self.version == "v2" and not controllers):
                return self.root / path.lstrip("/")
        return self.root
