"""argparse types for numbers with a range, so that a value out of range ends a command as a bad option does.

`--limit -5` used to stream 9,995 frames (a negative slice) and `--rate -5` to run closed loop: a number an option
cannot take is refused by argparse itself, with one line naming the option and exit 2.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def address(text: str) -> tuple[str, int]:
    """HOST:PORT as (host, port), an IPv6 host with or without its brackets; ValueError if it is not one."""
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def host_port(host: str, port: int) -> str:
    """`address` the other way: HOST:PORT as gRPC and people read it, an IPv6 host in brackets ([::1]:8001)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def number(kind: type = float, *, at_least: float | None = None, above: float | None = None) -> Callable[[str], float]:
    """An argparse `type` that reads `kind` (int or float, finite) and refuses what is below `at_least` or not above
    `above`."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if at_least is not None and value < at_least:
            raise argparse.ArgumentTypeError(f"must be at least {at_least:g}, got {text}")
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"must be more than {above:g}, got {text}")
        return value

    return parse
