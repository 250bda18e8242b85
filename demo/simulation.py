"""The running simulation behind the demo: cloud, attacker's proxy and device as processes, and the live attacker.

The three processes are started with the commands a user types (`splitleak cloud`, `splitleak attacker proxy`,
`splitleak device`), on free loopback ports: the device talks to the proxy, which forwards to the cloud and feeds
every request it captures to this process (splitleak.core.feed). The device loops over its frames, takes setting
changes between frames on its stdin (`--control -`) and writes every frame's record to its stdout (`--records -`).

Here, one thread per stream: the feed's requests go to a one-item mailbox, from which the attacker's thread takes the
newest (splitleak.attacker.live), so when the attacker falls behind it skips frames and the device never waits; the
device's records are read as they come. Each reconstructed frame is joined with the device's record of it (by the
wall-clock time the device sent it, which both carry) and becomes the `frame` the page shows.
"""

from __future__ import annotations

import collections
import json
import math
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from splitleak.attacker import live, proxy
from splitleak.core import compute, data, defences, feed, link, manifest, process
from splitleak.core.facts import IDENTITY_DATASETS
from splitleak.core.records import FrameRecord
from splitleak.demo import page

ROLES = ("cloud", "proxy", "device")
HISTORY_S = 60.0  # how far back the plots reach
JOIN_WAIT_S = 1.0  # how long a reconstructed frame waits for the device's record of it before it is shown without


@dataclass(frozen=True)
class Settings:
    """What the device starts with; the page changes split, link and defence while it runs."""

    model_dir: Path
    dataset: str
    split: str | None = None
    link: str = "loopback"
    defence: str = "none"
    strength: float | None = None
    max_rate: float = 30.0  # frames a second, as a phone's camera
    frames: int = 500  # distinct frames the device loops over
    tls: Path | None = None  # certificates for mutual TLS between device and cloud (splitleak tls make)


class Mailbox:
    """Holds the newest item only: `put` replaces one not yet taken (counted in `skipped`); `take` waits for one."""

    def __init__(self) -> None:
        self._item = None
        self._ready = threading.Condition()
        self.skipped = 0

    def put(self, item) -> None:
        with self._ready:
            self.skipped += self._item is not None
            self._item = item
            self._ready.notify()

    def take(self, timeout_s: float):
        with self._ready:
            self._ready.wait_for(lambda: self._item is not None, timeout_s)
            item, self._item = self._item, None
            return item


def _exit_reason(code: int) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return "exited normally" if code == 0 else f"exited with status {code}"


class Simulation:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.manifest = manifest.load(settings.model_dir)
        self.manifest.split(settings.split)  # an unknown split point fails here, before any process starts
        self.attacks = live.load_attacks(self.manifest)
        self.enabled = set(self.attacks)  # the attacks the page wants run
        self.started_ns = time.time_ns()
        self.processes: dict[str, subprocess.Popen] = {}
        self.exits: dict[str, str] = {}
        self.device_error: str | None = None  # the device's last word on stderr
        self.notice: str | None = None  # the answer to the last control change
        self.version = 0  # bumped whenever the page has something new
        self.frame: dict | None = None
        self.points: collections.deque[dict] = collections.deque()  # for the plots, oldest first
        self.point_seq = 0
        self.counts = collections.Counter()
        self._records: collections.OrderedDict[int, FrameRecord] = collections.OrderedDict()  # by device_send_ns
        self._recent: collections.deque[float] = collections.deque()  # when the last frames ended, for the rate
        self._heat_channels: dict[str, np.ndarray] = {}
        self._waiting: tuple[dict, float] | None = None  # a frame waiting for its record, since when
        self._lock = threading.RLock()
        self._stdin_lock = threading.Lock()
        self._mailbox = Mailbox()
        self._stopping = threading.Event()
        self.ciphertext: Path | None = None  # with TLS, where the proxy keeps the ciphertext it relayed

    # Starting and stopping.

    def start(self) -> None:
        s = self.settings
        dataset = self.dataset = data.load(s.dataset, "test")
        self.attacker = live.LiveAttacker(self.manifest, self.attacks, dataset=dataset, gallery=self._gallery())
        tls = ["--tls", str(s.tls)] if s.tls else []
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.settimeout(30)
            feed_to = f"127.0.0.1:{listener.getsockname()[1]}"
            # Each in a session of its own: a Ctrl-C is for this process, which stops them in order. Each dies with
            # this process too, should it be killed before it can (splitleak.core.process.dies_with_parent).
            # With mutual TLS the proxy holds no key the device trusts and can only relay ciphertext, so the attacks
            # run where the activations can still be read: at the curious cloud, which feeds them to this process.
            cloud_feed = ["--feed", feed_to] if s.tls else []
            cloud, cloud_port = process.start_cloud([s.model_dir], [*tls, *cloud_feed], own_session=True)
            self.processes["cloud"] = cloud
            if s.tls:
                self.ciphertext = Path(tempfile.mkdtemp(prefix="splitleak-demo-")) / "ciphertext"
                proxy_proc, proxy_port = proxy.start_process(
                    f"127.0.0.1:{cloud_port}", self.ciphertext, dataset=s.dataset, own_session=True
                )
            else:
                proxy_proc, proxy_port = proxy.start_process(
                    f"127.0.0.1:{cloud_port}", None, dataset=s.dataset, extra=["--feed", feed_to], own_session=True
                )
            self.processes["proxy"] = proxy_proc
            connection, _ = listener.accept()  # the feeding tap connects before it says it listens
        cmd = [sys.executable, "-m", "splitleak.cli", "device", "--cloud", f"127.0.0.1:{proxy_port}", *tls]
        cmd += ["--model-dir", str(s.model_dir), "--dataset", s.dataset, "--limit", str(s.frames), "--loop"]
        cmd += ["--max-rate", str(s.max_rate), "--link", s.link, "--defence", s.defence, "--control", "-"]
        cmd += ["--records", "-", *(["--split", s.split] if s.split else [])]
        cmd += ["--strength", str(s.strength)] if s.strength is not None else []
        self.processes["device"] = subprocess.Popen(
            process.dies_with_parent(cmd),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            bufsize=1,
            start_new_session=True,
        )
        for target, args in (
            (self._read_feed, (connection,)),
            (self._attack, ()),
            (self._read_records, ()),
            (self._read_device_errors, ()),
            (self._watch, ()),
        ):
            threading.Thread(target=target, args=args, name=f"demo{target.__name__}", daemon=True).start()

    def stop(self) -> dict[str, int]:
        """Stop the device (its control input closes, as a controller's would), then the proxy, then the cloud."""
        self._stopping.set()
        device = self.processes.get("device")
        if device is not None:
            with self._stdin_lock:
                try:
                    device.stdin.close()
                except OSError:
                    pass
            try:
                device.wait(5)
            except subprocess.TimeoutExpired:
                pass  # process.stop sees to it
        codes = {role: process.stop(self.processes[role]) for role in reversed(ROLES) if role in self.processes}
        if self.ciphertext is not None:
            shutil.rmtree(self.ciphertext.parent, ignore_errors=True)
        return codes

    # Changes from the page.

    def control(self, change: dict) -> None:
        """Apply a change from the page: attacks here, the rest on the device. ValueError if it cannot be."""
        allowed = {"split", "link", "defence", "strength", "attacks", "device"}
        if not isinstance(change, dict) or not change or set(change) - allowed:
            raise ValueError(f"a change is a JSON object with any of {', '.join(sorted(allowed))}")
        # JSON gives any type anywhere: check each value's type before it is looked up or sent on to the device.
        for key in ("split", "link", "defence", "device"):
            if key in change and not isinstance(change[key], str):
                raise ValueError(f"{key} must be a name (a string), not {change[key]!r}")
        strength = change.get("strength", 0.0)
        if isinstance(strength, bool) or not isinstance(strength, int | float) or not math.isfinite(strength):
            raise ValueError(f"strength must be a finite number, not {strength!r}")
        attacks = change.get("attacks", [])
        if not isinstance(attacks, list) or not all(isinstance(a, str) for a in attacks):
            raise ValueError(f"attacks must be a list of attack names, not {attacks!r}")
        if "split" in change and change["split"] not in self.manifest.splits:
            raise ValueError(f"no split point {change['split']!r}; split points: {', '.join(self.manifest.splits)}")
        if "link" in change and change["link"] not in link.PROFILES:
            raise ValueError(f"no link profile {change['link']!r}; profiles: {', '.join(link.PROFILES)}")
        if "device" in change and change["device"] not in compute.PROFILES:
            raise ValueError(f"no device profile {change['device']!r}; profiles: {', '.join(compute.PROFILES)}")
        if "defence" in change and change["defence"] not in defences.DEFENCES:
            raise ValueError(f"no defence {change['defence']!r}; defences: {', '.join(defences.DEFENCES)}")
        if "defence" in change and "strength" in change:  # a strength alone is for the device's defence to check
            strengths = defences.DEFENCES[change["defence"]].strengths
            if not strengths.allows(change["strength"]):
                raise ValueError(f"{change['defence']} takes {strengths.describe()}, not {change['strength']!r}")
        if "attacks" in change:
            unknown = set(change["attacks"]) - set(self.attacks)
            if unknown:
                raise ValueError(f"no exported attack {', '.join(sorted(unknown))}; attacks: {', '.join(self.attacks)}")
            with self._lock:
                self.enabled = set(change["attacks"])
                self.version += 1
        device_change = {k: v for k, v in change.items() if k != "attacks"}
        if device_change:
            device = self.processes["device"]
            if device.poll() is not None:
                raise ValueError("the device is not running")
            with self._stdin_lock:
                device.stdin.write(json.dumps(device_change) + "\n")
                device.stdin.flush()

    def _gallery(self) -> data.Dataset | None:
        """Other photos of the people in the frames (the train split), where the data set's labels name people."""
        faces = self.settings.dataset in IDENTITY_DATASETS and self.manifest.dataset == self.settings.dataset
        return data.load(self.settings.dataset, "train") if faces else None

    def _identity_note(self) -> str | None:
        """Why the page names no one: the model tells people apart, but the frames say nothing of who is in them."""
        m = self.manifest
        if self.attacker.gallery is not None or m.dataset not in IDENTITY_DATASETS:
            return None
        return (
            f"Identity not available: the frames come from {self.dataset.name}, whose labels "
            f"({' / '.join(self.dataset.classes)}) say nothing of who is in a picture, so the attacker has no gallery "
            f"of the same people to name anyone against. With {m.dataset} in the data root (../shared/datasets or "
            f"$SPLITLEAK_DATA), the demo streams its faces and names who is in each."
        )

    def _wire_note(self) -> str | None:
        if self.settings.tls is None:
            return None
        return (
            "Mutual TLS between device and cloud: the attacker's proxy holds no key the device trusts, so it relays "
            "ciphertext it cannot read. The reconstructions below are the curious cloud's, which decrypts every "
            "activation it is sent: TLS protects the wire, not the input."
        )

    # What the page is sent.

    def config(self) -> dict:
        """What does not change while the demo runs: the choices the page offers, and what each means."""
        s = self.settings
        start = {
            "split": s.split or self.manifest.default_split,
            "link": s.link,
            "defence": s.defence,
            "device": "host",
        }
        start |= {"strength": s.strength, "max_rate": s.max_rate}
        return page.config(
            self.manifest,
            dataset=s.dataset,
            attacks=self.attacks,
            gallery=self.attacker.gallery,
            identity_note=self._identity_note(),
            wire=self._wire_note(),
            start=start,
        )

    def status(self) -> dict:
        with self._lock:
            now = time.time()
            while self._recent and self._recent[0] < now - 2:
                self._recent.popleft()
            return {
                "processes": {
                    role: {"pid": p.pid, "running": role not in self.exits, "exit": self.exits.get(role)}
                    for role, p in self.processes.items()
                },
                "message": self._message(),
                "notice": self.notice,
                "device_fps": len(self._recent) / 2,
                "counts": dict(self.counts, skipped=self._mailbox.skipped),
                "attacks": sorted(self.enabled),
            }

    def updates(self, since_version: int, since_point: int) -> tuple[int, dict | None, list[dict], int]:
        """(version, the frame if newer than `since_version`, plot points after `since_point`, last point)."""
        with self._lock:
            frame = self.frame if self.version != since_version else None
            points = [p for p in self.points if p["seq"] > since_point]
            return self.version, frame, points, self.point_seq

    def _message(self) -> str | None:
        if not self.exits:
            return None
        parts = [f"The {role} process ({self.processes[role].pid}) {how}." for role, how in self.exits.items()]
        if "device" in self.exits and self.device_error:
            parts.append(f"The device said: {self.device_error}")
        parts.append("The simulation has stopped: start `splitleak demo` again.")
        return " ".join(parts)

    # The threads.

    def _read_feed(self, connection: socket.socket) -> None:
        with connection:
            for captured_ns, request_bytes in feed.receive(connection):
                with self._lock:
                    self.counts["intercepted"] += 1
                self._mailbox.put((captured_ns, request_bytes))

    def _attack(self) -> None:
        while not self._stopping.is_set():
            item = self._mailbox.take(timeout_s=0.5)
            if item is None:
                continue
            got = self.attacker.intercept(item[1], item[0], attacks=set(self.enabled))
            if got is None:
                continue
            if got.split not in self._heat_channels:  # from the first frame at each split, so the maps hold still
                self._heat_channels[got.split] = page.busiest_channels(got.activation)
            view = page.frame(got, self.manifest.classes, self._heat_channels[got.split])
            send_ns = view["device_send_ns"]
            with self._lock:
                self.counts["attacked"] += 1
                self._point({"t": self._t(send_ns), "split": view["split"], "ssim": view["ssim"]})
                record = self._records.get(send_ns)
                if record is not None:
                    self._show(page.join(view, record, self.manifest.classes))
                else:  # the cloud's answer is still on its way: show both together
                    self._waiting = (view, time.monotonic())

    def _show(self, view: dict) -> None:
        self.frame = view
        self.version += 1

    def _read_records(self) -> None:
        for line in self.processes["device"].stdout:
            if not line.startswith("{"):
                print(line, end="", file=sys.stderr)  # the device's own words, for the terminal
                continue
            event = json.loads(line)
            if "control" in event:
                with self._lock:
                    self.notice = None if event["error"] is None else f"not applied: {event['error']}"
                    self.version += 1
                continue
            with self._lock:
                self._on_record(FrameRecord.from_json(event))

    def _on_record(self, record: FrameRecord) -> None:
        self.counts["frames"] += 1
        send_ns = record.device_send_ns
        self._records[send_ns] = record
        while len(self._records) > 256:
            self._records.popitem(last=False)
        if self._waiting is not None and self._waiting[0]["device_send_ns"] == send_ns:
            self._show(page.join(self._waiting[0], record, self.manifest.classes))
            self._waiting = None
        if record.error is not None:
            self.notice = f"the cloud refused a frame: {record.error}"
            return
        self._recent.append(record.end_ns / 1e9)
        self._point({"t": self._t(send_ns), "split": record.split, "latency": record.total_ms})

    def _read_device_errors(self) -> None:
        for line in self.processes["device"].stderr:
            print(line, end="", file=sys.stderr)
            if line.strip():
                self.device_error = line.strip().removeprefix("device: ")

    def _watch(self) -> None:
        while not self._stopping.wait(0.1):
            with self._lock:
                for role, process in self.processes.items():
                    code = process.poll()
                    if code is not None and role not in self.exits:
                        self.exits[role] = _exit_reason(code)
                        self.version += 1
                if self._waiting is not None and time.monotonic() - self._waiting[1] > JOIN_WAIT_S:
                    self._show(self._waiting[0])  # no record came (the device or the cloud has gone)
                    self._waiting = None

    def _point(self, point: dict) -> None:
        self.point_seq += 1
        self.points.append(point | {"seq": self.point_seq})
        while self.points and self.points[0]["t"] < point["t"] - HISTORY_S:
            self.points.popleft()

    def _t(self, ns: int) -> float:
        return (ns - self.started_ns) / 1e9
