"""Two network namespaces joined by a veth pair, with the kernel shaping what leaves each end.

The device and the cloud each get a namespace of their own, so their traffic crosses a real network interface and
the kernel's queueing disciplines (`tc`) instead of loopback. Used by bench/link_check.py and
tests/test_netns_link.py to check splitleak.core.link against the kernel.

    with VethPair() as pair:
        port = pair.start_cloud(model_dir)           # listens on pair.cloud_ip
        pair.shape("device", rate_mbps=5.85)         # tbf on what the device sends
        device = pair.popen("device", [sys.executable, "-m", "splitleak.cli", "device", "--cloud", ...])

Leaving the `with` block (normally, on an error or on Ctrl-C) stops the processes started through `popen` and deletes
both namespaces, which deletes the veth pair with them. A SIGKILL cannot be caught: then the processes started through
`popen` are sent SIGTERM by Linux (splitleak.core.process.dies_with_parent), and the next VethPair deletes what the
killed run left (`remove_stale`): every name here carries the pid of the process that made it, and a name whose
process is gone is left over. That holds while every run shares this machine's pids (one pid namespace), as runs
started here do.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

from splitleak.core.process import alive, dies_with_parent

SIDES = ("device", "cloud")
MTU = 1500
# tbf's bucket must hold the largest frame on the veth (MTU plus the 14-byte Ethernet header), and tc rounds it down
# (1,514 shows as 1,513): a little more than one frame, and no more than that (see shape).
BURST_BYTES = 1600
# The names a run makes, each with its pid: namespaces (VethPair, and unavailable's probe) and veth ends, which stay in
# this namespace if a run is killed before it moves them into theirs.
NETNS_NAME = re.compile(r"splitleak-(?:probe-)?(\d+)(?:-(?:device|cloud))?")
VETH_NAME = re.compile(r"sl(\d+)[dc]")


class NetnsError(RuntimeError):
    """A command that sets up or shapes the namespaces failed; the message has its stderr."""


def unavailable() -> str | None:
    """Why two namespaces cannot be made on this machine, or None when they can."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return "network namespaces and tc need root (CAP_NET_ADMIN); run as root"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"iproute2 is not installed ({', '.join(missing)} not found)"
    probe = f"splitleak-probe-{os.getpid()}"  # root in a container may still lack CAP_NET_ADMIN
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace here: {made.stderr.strip() or f'exit {made.returncode}'}"
    subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def _run(*args: str) -> str:
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise NetnsError(f"{' '.join(args)}: {done.stderr.strip() or f'exit {done.returncode}'}")
    return done.stdout


def remove_stale() -> list[str]:
    """Delete the namespaces and veth ends left by runs whose process is gone (killed with SIGKILL); their names."""
    stale = _names(["ip", "-j", "netns", "list"], "name", NETNS_NAME)
    for name in stale:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)
    veths = _names(["ip", "-j", "link", "show"], "ifname", VETH_NAME)
    for name in veths:  # deleting one end of a veth pair deletes the other
        subprocess.run(["ip", "link", "del", name], capture_output=True)
    return stale + veths


def _names(command: list[str], key: str, pattern: re.Pattern) -> list[str]:
    """The names `command` lists (as JSON objects under `key`) that `pattern` matches, with the pid in them gone."""
    return [
        entry[key]
        for entry in json.loads(_run(*command) or "[]")
        if (match := pattern.fullmatch(entry[key])) and not alive(int(match.group(1)))
    ]


def free_subnet(rng: random.Random | None = None) -> ipaddress.IPv4Network:
    """A 10.x.y.z/30 that overlaps no address or route of this (the root) namespace.

    The two namespaces see only each other, so a clash could not misroute their traffic; a subnet of our own keeps
    the run's addresses from being mistaken for the host's in `ip` output and logs."""
    taken = []
    for entry in json.loads(_run("ip", "-j", "-4", "addr", "show")):
        taken += [ipaddress.ip_network(f"{a['local']}/{a['prefixlen']}", strict=False) for a in entry["addr_info"]]
    for route in json.loads(_run("ip", "-j", "-4", "route", "show", "table", "all")):
        try:
            taken.append(ipaddress.ip_network(route["dst"], strict=False))
        except (KeyError, ValueError):  # "default" and the like
            pass
    rng = rng or random.Random()
    for _ in range(1000):
        subnet = ipaddress.ip_network(f"10.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(64) * 4}/30")
        if not any(subnet.overlaps(net) for net in taken):
            return subnet
    raise NetnsError("no free 10.0.0.0/8 /30 found")


class VethPair:
    """Namespaces `splitleak-PID-device` and `splitleak-PID-cloud`, one end of a veth pair in each, a /30 between."""

    def __init__(self) -> None:
        tag = f"splitleak-{os.getpid()}"
        self.netns = {side: f"{tag}-{side}" for side in SIDES}
        self.interface = {side: f"sl{os.getpid()}{side[0]}"[:15] for side in SIDES}  # interface names: 15 chars
        self.subnet: ipaddress.IPv4Network | None = None
        self.ip: dict[str, str] = {}
        self.processes: list[subprocess.Popen] = []
        self._old_handlers: dict[int, object] = {}

    @property
    def device_ip(self) -> str:
        return self.ip["device"]

    @property
    def cloud_ip(self) -> str:
        return self.ip["cloud"]

    def __enter__(self) -> VethPair:
        # SIGTERM and SIGHUP become KeyboardInterrupt, so that `kill` or a closed terminal also cleans up; SIGINT
        # too, even where a parent started us with it ignored (as a non-interactive shell does with `&`).
        if threading.current_thread() is threading.main_thread():  # only the main thread may set handlers
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                self._old_handlers[sig] = signal.signal(sig, _interrupt)
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create(self) -> None:
        remove_stale()
        self.subnet = free_subnet()
        hosts = list(self.subnet.hosts())  # a /30 has exactly two
        self.ip = {"device": str(hosts[0]), "cloud": str(hosts[1])}
        for side in SIDES:
            _run("ip", "netns", "add", self.netns[side])
        _run("ip", "link", "add", self.interface["device"], "type", "veth", "peer", "name", self.interface["cloud"])
        for side in SIDES:
            ns, dev = self.netns[side], self.interface[side]
            _run("ip", "link", "set", dev, "netns", ns)
            _run("ip", "-n", ns, "addr", "add", f"{self.ip[side]}/{self.subnet.prefixlen}", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "mtu", str(MTU), "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")

    def describe(self) -> str:
        return (
            f"namespaces {self.netns['device']} ({self.device_ip}) and {self.netns['cloud']} ({self.cloud_ip}), "
            f"veth {self.interface['device']} <-> {self.interface['cloud']}, MTU {MTU}"
        )

    def shape(
        self,
        side: str,
        rate_mbps: float | None,
        *,
        delay_ms: float = 0.0,
        burst_bytes: int = BURST_BYTES,
        limit_bytes: int = 1 << 22,
    ) -> None:
        """Shape what leaves `side` with a token bucket (tc tbf) at `rate_mbps`; None takes the shaping off.

        `burst_bytes` is the bucket: after an idle moment that many bytes leave at once, a head start the link model
        does not give a message, so it is kept to one frame. `limit_bytes` is the queue behind the bucket, big
        enough that nothing is dropped (the link model loses nothing). `delay_ms` > 0 puts netem behind the bucket
        to hold every packet that long (needs sch_netem)."""
        ns, dev = self.netns[side], self.interface[side]
        subprocess.run(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], capture_output=True)
        if rate_mbps is None:
            return
        rate = f"{rate_mbps * 1e6:.0f}bit"
        tbf = ["tbf", "rate", rate, "burst", str(burst_bytes), "limit", str(limit_bytes)]
        _run("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "handle", "1:", *tbf)
        if delay_ms > 0:  # netem replaces tbf's inner fifo; it orphans what it holds, so TCP Small Queues let it fill
            netem = ["netem", "delay", f"{delay_ms}ms", "limit", "100000"]
            _run("tc", "-n", ns, "qdisc", "add", "dev", dev, "parent", "1:1", "handle", "10:", *netem)

    def qdisc_stats(self, side: str) -> dict:
        """The root qdisc's counters on `side` (bytes, packets, drops, ...), from `tc -s -j`."""
        out = json.loads(_run("tc", "-s", "-j", "-n", self.netns[side], "qdisc", "show", "dev", self.interface[side]))
        return next((qdisc for qdisc in out if qdisc.get("root")), {})

    def supports(self, qdisc: str, *args: str) -> str | None:
        """None if the kernel can attach `qdisc` (with `args`) here, else tc's reason; leaves the device's end bare."""
        ns, dev = self.netns["device"], self.interface["device"]
        done = subprocess.run(
            ["tc", "-n", ns, "qdisc", "add", "dev", dev, "root", qdisc, *args], capture_output=True, text=True
        )
        if done.returncode != 0:
            return done.stderr.strip() or f"tc exit {done.returncode}"
        self.shape("device", None)
        return None

    def start_cloud(self, model_dir: str | Path, timeout_s: float = 60.0) -> int:
        """Start `splitleak cloud` in the cloud's namespace, listening on its address; returns the port."""
        cmd = [sys.executable, "-m", "splitleak.cli", "cloud", "--host", self.cloud_ip, "--port", "0"]
        proc = self.popen("cloud", [*cmd, "--models", str(model_dir)], stdout=subprocess.PIPE, text=True)
        line = proc.stdout.readline()  # "cloud listening on HOST:PORT serving ...", once it serves
        match = re.search(r"listening on [\d.]+:(\d+)", line)
        if match is None:
            raise NetnsError(f"the cloud did not start (exit {proc.wait(timeout_s)}): {line!r}")
        return int(match.group(1))

    def popen(self, side: str, args: list[str], **kwargs) -> subprocess.Popen:
        """Start `args` inside `side`'s namespace; it is stopped when the pair is closed."""
        # `ip netns exec` execs the command, so the Popen's pid is the command's own.
        proc = subprocess.Popen(dies_with_parent(["ip", "netns", "exec", self.netns[side], *args]), **kwargs)
        self.processes.append(proc)
        return proc

    def close(self) -> None:
        for sig in self._old_handlers:  # a second Ctrl-C must not cut the cleanup short
            signal.signal(sig, signal.SIG_IGN)
        for proc in self.processes:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.processes:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes.clear()
        for side in SIDES:  # deleting a namespace deletes the veth end in it, and with it the pair
            subprocess.run(["ip", "netns", "del", self.netns[side]], capture_output=True)
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers.clear()


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
