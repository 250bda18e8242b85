"""`splitleak device --control FILE`: split, link and defence changes a running device takes between frames.

`splitleak demo` drives the device so, from the page's controls, through the device's stdin."""

from __future__ import annotations

import json
import os
import queue
import signal
import threading

from splitleak.core import compute, defences, link
from splitleak.device.head import Head, TimeModel


class Control:
    """Settings a running device takes from outside, between frames (`--control`).

    One JSON object a line, with any of `split`, `link` (a profile name), `defence`, `strength` and `device` (a
    compute profile, splitleak.core.compute, applied by the time model), e.g. {"split": "layer2"} or
    {"defence": "gaussian", "strength": 0.5}. A line is applied whole before the next frame,
    or not at all, and `report` hears which: {"control": the line, "error": null or why}. A strength alone keeps the
    defence; a defence alone takes its default strength. When the lines end (the controller has gone), the device
    stops as if interrupted.
    """

    SETTINGS = ("split", "link", "defence", "strength", "device")

    def __init__(
        self,
        head: Head,
        defence: defences.Defence,
        profile: link.LinkProfile,
        *,
        threads: int = 1,
        report=None,
        kernel: bool = False,
    ) -> None:
        self.head, self.defence, self.profile = head, defence, profile
        self.threads = threads
        self.kernel = kernel  # the process runs under a cgroup CPU quota: a device change would slow it twice
        self.report = report or (lambda event: None)
        self._heads = {head.split.name: head}  # a split's session is built once, when it is first asked for
        self._lines: queue.Queue[str] = queue.Queue()

    def listen(self, lines) -> None:
        """Take changes from `lines` (such as sys.stdin) on a thread of their own. Call from the main thread."""
        # The end of the lines is delivered as SIGINT; a parent that ignores SIGINT (a demo or test harness that
        # shields itself from Ctrl-C) would pass that on to us, and the device would never stop.
        signal.signal(signal.SIGINT, signal.default_int_handler)

        def read() -> None:
            for line in lines:
                if line.strip():
                    self._lines.put(line)
            # A real SIGINT, not _thread.interrupt_main(): only a signal wakes a main thread blocked in a lock.
            os.kill(os.getpid(), signal.SIGINT)

        threading.Thread(target=read, name="device-control", daemon=True).start()

    def apply(self, uplink: link.Link, downlink: link.Link) -> tuple[Head, defences.Defence]:
        """Apply what arrived since the last frame; returns the head and the defence for the next one."""
        while not self._lines.empty():
            line = self._lines.get()
            try:
                change = json.loads(line)
                self._change(change)
            except (ValueError, KeyError, TypeError) as e:
                self.report({"control": line.strip(), "error": e.args[0] if isinstance(e, KeyError) else str(e)})
            else:
                self.report({"control": change, "error": None})
        uplink.profile = downlink.profile = self.profile
        return self.head, self.defence

    def _change(self, change: dict) -> None:
        if not isinstance(change, dict) or not change or set(change) - set(self.SETTINGS):
            raise KeyError(f"expected a JSON object with any of {', '.join(self.SETTINGS)}; got {change!r}")
        head = self.head
        if "split" in change:
            name = str(change["split"])
            head = self._heads.get(name) or Head(self.head.manifest.root, name, self.threads, self.head.time_model)
        profile = link.profile(change["link"]) if "link" in change else self.profile
        name = change.get("defence", self.defence.name)
        strength = change.get("strength", None if "defence" in change else self.defence.strength)
        defence = defences.build(name, strength=strength, split=head.split)
        time_model = self._time_model(change["device"]) if "device" in change else head.time_model
        self._heads[head.split.name] = head
        for each in self._heads.values():
            each.time_model = time_model
        self.head, self.profile, self.defence = head, profile, defence

    def _time_model(self, device) -> TimeModel | None:
        if self.kernel:
            raise ValueError(
                "this device runs under the kernel's CPU quota; start it with --slow-by model to change it"
            )
        if device not in compute.PROFILES:
            raise KeyError(f"no device profile {device!r}; profiles: {', '.join(compute.PROFILES)}")
        calibration = compute.calibrate(self.head.manifest.root)
        slowdown = compute.PROFILES[device].slowdown(calibration.host_gmacs)
        return TimeModel(calibration.head_ms, slowdown) if slowdown > 1 else None
