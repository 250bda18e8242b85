"""`splitleak recommend`: the fastest split point and defence that meet privacy and accuracy bounds on a link.

Neurosurgeon (Kang et al., ASPLOS 2017) picks the split point with the lowest latency for the link at hand; this
adds the privacy constraint: among the rows of a sweep (`splitleak sweep`) for the link, keep those where every
attack's mean SSIM is at most --max-ssim and the accuracy drop from the undefended model is at most
--max-accuracy-drop points, then take the lowest median (or p95) total latency. It also says why every other
configuration lost: the first bound it breaks, or how much slower it is.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from splitleak.core import compute, link
from splitleak.core.facts import RECOGNISABLE_SSIM
from splitleak.study.rows import SweepRow, latency_column, read_json


@dataclass(frozen=True)
class Recommendation:
    """What `recommend` found among a sweep's rows for one link."""

    best: SweepRow | None  # the fastest row within every bound; None when none is
    fastest: SweepRow | None  # the undefended latency-optimal row, Neurosurgeon's choice
    accurate: SweepRow | None  # the fastest row within the accuracy bound alone (privacy ignored)
    verdicts: list[tuple[SweepRow, str]]  # every other row on the link, fastest first, and why it lost
    by: str  # the total latency minimised: "median" or "p95"


def name(row: SweepRow) -> str:
    kind = " (trained)" if row.training_time else ""
    return f"{row.model} split {row.split}, {row.defence} {row.strength:g}{kind}"


def why_not(row: SweepRow, max_ssim: float, max_drop: float) -> str | None:
    """The first bound `row` breaks, in words; None if it meets them all."""
    for attack, scores in row.attacks.items():
        if scores.ssim > max_ssim:
            return f"{attack} recovers SSIM {scores.ssim:.2f} > {max_ssim:g}"
    if row.accuracy_drop > max_drop:
        return f"loses {row.accuracy_drop:.1f} points of accuracy > {max_drop:g}"
    return None


def recommend(
    table: list[SweepRow],
    *,
    link_name: str,
    max_ssim: float,
    max_drop: float,
    by: str = "median",
    device: str = "host",
) -> Recommendation:
    """The fastest row on `link_name` for `device` within both bounds, the rows to weigh it against, and why each
    other lost."""
    on_device = [r for r in table if r.device == device]
    if not on_device:
        devices = sorted({r.device for r in table})
        raise ValueError(
            f"the sweep has no rows for device {device!r}; it has {', '.join(devices)} (sweep with --device {device})"
        )
    rows = [r for r in on_device if r.link == link_name]
    if not rows:
        links = sorted({r.link for r in on_device})
        raise ValueError(f"the sweep has no rows for link {link_name!r}; it has {', '.join(links)}")
    rows.sort(key=lambda r: r.total_ms(by))
    undefended = [r for r in rows if r.defence == "none" and not r.training_time]
    accurate = next((r for r in rows if r.accuracy_drop <= max_drop), None)
    eligible = [r for r in rows if why_not(r, max_ssim, max_drop) is None]
    best = eligible[0] if eligible else None
    verdicts = []
    for r in rows:
        if r is best:
            continue
        reason = why_not(r, max_ssim, max_drop)
        if reason is None:
            reason = f"meets the bounds, but {r.total_ms(by) - best.total_ms(by):.1f} ms slower"
        verdicts.append((r, reason))
    return Recommendation(best, undefended[0] if undefended else None, accurate, verdicts, by)


def report(result: Recommendation, *, link_name: str, max_ssim: float, max_drop: float, device: str = "host") -> str:
    by, latency = result.by, latency_column("total", result.by)
    bounds = f"every attack's SSIM <= {max_ssim:g}, accuracy drop <= {max_drop:g} points, on {link_name}"
    bounds += f", device {device}" if device != "host" else ""
    best = result.best
    lines = []
    if best is None:
        lines.append(f"No configuration meets the bounds ({bounds}).")
    else:
        scores = ", ".join(f"{a} SSIM {s.ssim:.2f}" for a, s in best.attacks.items())
        lines += [
            f"Recommended ({bounds}): {name(best)}",
            f"  {best.total_ms(by):.1f} ms per frame ({latency}), accuracy {100 * best.accuracy:.1f}% "
            f"(drop {best.accuracy_drop:.1f} points), {best.bytes_up:.0f} bytes up; {scores}",
        ]
    for what, row in (
        ("Undefended latency-optimal split", result.fastest),
        ("Fastest within the accuracy bound", result.accurate),
    ):
        if row is None:
            continue
        line = f"{what}: {name(row)}, {row.total_ms(by):.1f} ms, max SSIM {row.max_ssim:.2f}"
        if best is not None:
            line += f"; the recommendation takes {best.total_ms(by) - row.total_ms(by):+.1f} ms per frame against it"
        lines.append(line)
    lines.append("")
    lines.append("Why the others lost (fastest first):")
    lines += [f"  {r.total_ms(by):8.1f} ms  {name(r)}: {reason}" for r, reason in result.verdicts]
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=Path("sweep"), help="a sweep's folder (or its sweep.json)")
    parser.add_argument("--link", default="4g", choices=list(link.PROFILES))
    parser.add_argument(
        "--device", default="host", choices=list(compute.PROFILES), help="device profile (the sweep's --device)"
    )
    parser.add_argument("--max-ssim", type=float, default=RECOGNISABLE_SSIM, help="bound on every attack's mean SSIM")
    parser.add_argument("--max-accuracy-drop", type=float, default=1.0, help="bound on the accuracy lost, in points")
    parser.add_argument("--by", choices=("median", "p95"), default="median", help="which latency to minimise")
    parser.add_argument("--json", type=Path, help="also write the recommendation here")
    return parser


def main(args: argparse.Namespace) -> int:
    path = args.sweep / "sweep.json" if args.sweep.is_dir() else args.sweep
    if not path.exists():
        print(f"recommend: {path} not found; run `splitleak sweep --out {args.sweep}` first", file=sys.stderr)
        return 2
    table = read_json(path)
    try:
        result = recommend(
            table,
            link_name=args.link,
            max_ssim=args.max_ssim,
            max_drop=args.max_accuracy_drop,
            by=args.by,
            device=args.device,
        )
    except ValueError as e:
        print(f"recommend: {e}", file=sys.stderr)
        return 2
    bounds = {"max_ssim": args.max_ssim, "max_drop": args.max_accuracy_drop}
    print(report(result, link_name=args.link, device=args.device, **bounds))
    if args.json:
        chosen = {"best": result.best, "fastest": result.fastest, "accurate": result.accurate}
        verdicts = [{"config": name(r), "reason": reason} for r, reason in result.verdicts]
        flat = {what: None if row is None else row.to_flat() for what, row in chosen.items()}
        args.json.write_text(json.dumps({**flat, "others": verdicts}, indent=1))
    return 0 if result.best is not None else 1
