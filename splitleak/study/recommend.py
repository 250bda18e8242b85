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
from pathlib import Path

from splitleak.core import link
from splitleak.core.facts import RECOGNISABLE_SSIM


def name(row: dict) -> str:
    kind = " (trained)" if row["training_time"] else ""
    return f"{row['model']} split {row['split']}, {row['defence']} {row['strength']:g}{kind}"


def attacks(row: dict) -> list[str]:
    return [k.removesuffix("_ssim") for k in row if k.endswith("_ssim") and k != "max_ssim"]


def why_not(row: dict, max_ssim: float, max_drop: float) -> str | None:
    """The first bound `row` breaks, in words; None if it meets them all."""
    for attack in attacks(row):
        if row[f"{attack}_ssim"] > max_ssim:
            return f"{attack} recovers SSIM {row[f'{attack}_ssim']:.2f} > {max_ssim:g}"
    if row["accuracy_drop"] > max_drop:
        return f"loses {row['accuracy_drop']:.1f} points of accuracy > {max_drop:g}"
    return None


def recommend(table: list[dict], *, link_name: str, max_ssim: float, max_drop: float, by: str = "median") -> dict:
    """{"best": row or None, "fastest": the undefended latency-optimal row, "accurate": the fastest row within the
    accuracy bound alone (privacy ignored), "verdicts": [(row, reason)]}."""
    rows = [r for r in table if r["link"] == link_name]
    if not rows:
        links = sorted({r["link"] for r in table})
        raise ValueError(f"the sweep has no rows for link {link_name!r}; it has {', '.join(links)}")
    latency = f"total_ms_{by}"
    rows.sort(key=lambda r: r[latency])
    undefended = [r for r in rows if r["defence"] == "none" and not r["training_time"]]
    fastest = undefended[0] if undefended else None
    accurate = next((r for r in rows if r["accuracy_drop"] <= max_drop), None)
    eligible = [r for r in rows if why_not(r, max_ssim, max_drop) is None]
    best = eligible[0] if eligible else None
    verdicts = []
    for r in rows:
        if r is best:
            continue
        reason = why_not(r, max_ssim, max_drop)
        if reason is None:
            reason = f"meets the bounds, but {r[latency] - best[latency]:.1f} ms slower"
        verdicts.append((r, reason))
    return {"best": best, "fastest": fastest, "accurate": accurate, "verdicts": verdicts, "latency": latency}


def report(result: dict, *, link_name: str, max_ssim: float, max_drop: float) -> str:
    latency = result["latency"]
    bounds = f"every attack's SSIM <= {max_ssim:g}, accuracy drop <= {max_drop:g} points, on {link_name}"
    best, fastest = result["best"], result["fastest"]
    lines = []
    if best is None:
        lines.append(f"No configuration meets the bounds ({bounds}).")
    else:
        scores = ", ".join(f"{a} SSIM {best[f'{a}_ssim']:.2f}" for a in attacks(best))
        lines += [
            f"Recommended ({bounds}): {name(best)}",
            f"  {best[latency]:.1f} ms per frame ({latency}), accuracy {100 * best['accuracy']:.1f}% "
            f"(drop {best['accuracy_drop']:.1f} points), {best['bytes_up']:.0f} bytes up; {scores}",
        ]
    for what, row in (
        ("Undefended latency-optimal split", fastest),
        ("Fastest within the accuracy bound", result["accurate"]),
    ):
        if row is not None:
            lines.append(
                f"{what}: {name(row)}, {row[latency]:.1f} ms, max SSIM {row['max_ssim']:.2f}"
                + (
                    ""
                    if best is None
                    else f"; the recommendation takes {best[latency] - row[latency]:+.1f} ms per frame against it"
                )
            )
    lines.append("")
    lines.append("Why the others lost (fastest first):")
    lines += [f"  {r[latency]:8.1f} ms  {name(r)}: {reason}" for r, reason in result["verdicts"]]
    return "\n".join(lines)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", type=Path, default=Path("sweep"), help="a sweep's folder (or its sweep.json)")
    parser.add_argument("--link", default="4g", choices=list(link.PROFILES))
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
    table = json.loads(path.read_text())
    try:
        result = recommend(
            table, link_name=args.link, max_ssim=args.max_ssim, max_drop=args.max_accuracy_drop, by=args.by
        )
    except ValueError as e:
        print(f"recommend: {e}", file=sys.stderr)
        return 2
    print(report(result, link_name=args.link, max_ssim=args.max_ssim, max_drop=args.max_accuracy_drop))
    if args.json:
        verdicts = [{"config": name(r), "reason": reason} for r, reason in result["verdicts"]]
        chosen = {k: result[k] for k in ("best", "fastest", "accurate")}
        args.json.write_text(json.dumps({**chosen, "others": verdicts}, indent=1))
    return 0 if result["best"] is not None else 1
