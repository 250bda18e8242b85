"""Noise against dropout at the cut layer, from a sweep: He et al.'s comparison, as markdown.

He, Zhang and Lee, "Attacking and protecting data privacy in edge-cloud collaborative inference systems" (IEEE IoT
Journal, 2020) found that dropout at the cut layer beats Gaussian and Laplacian noise on the accuracy-SSIM curve
(for the same accuracy, the inverse network recovers less), and that the dropout rate needed falls as the split
moves deeper. This reads a `splitleak sweep` table with those defences at several strengths and prints, per split:
each defence's accuracy and the strongest attack's SSIM at every strength, the lowest SSIM each defence reaches
within an accuracy budget, and the smallest strength that brings every attack below SSIM 0.3 (RECOGNISABLE_SSIM).

    .venv/bin/splitleak sweep --defence gaussian:0.5,1,2,4 --defence laplace:0.5,1,2,4 \\
        --defence dropout:0.3,0.6,0.8,0.9 --attack decoder --link wifi --out sweep-noise
    .venv/bin/python bench/defence_curves.py sweep-noise/sweep.json --budget 1 --budget 5
"""

from __future__ import annotations

import argparse
from pathlib import Path

from splitleak.core.facts import RECOGNISABLE_SSIM
from splitleak.study.rows import SweepRow, read_json


def curves(table: list[SweepRow]) -> dict[str, dict[str, list[SweepRow]]]:
    """split -> defence -> rows by strength (one link's rows: accuracy and leakage do not depend on it)."""
    link = table[0].link
    out: dict[str, dict[str, list[SweepRow]]] = {}
    for row in table:
        if row.link == link and not row.training_time:
            out.setdefault(row.split, {}).setdefault(row.defence, []).append(row)
    for by_defence in out.values():
        for rows in by_defence.values():
            rows.sort(key=lambda r: r.strength)
    return out


def lowest_ssim_within(rows: list[SweepRow], budget: float) -> float | None:
    """The lowest strongest-attack SSIM among `rows` that lose at most `budget` points of accuracy."""
    kept = [r.max_ssim for r in rows if r.accuracy_drop <= budget]
    return min(kept) if kept else None


def report(table: list[SweepRow], budgets: list[float]) -> str:
    by_split = curves(table)
    noise = [d for d in ("gaussian", "laplace", "dropout", "channel-dropout") if any(d in v for v in by_split.values())]
    lines = ["| split | defence | strength | accuracy | drop (points) | max SSIM |", "|---|---|---|---|---|---|"]
    for split, by_defence in by_split.items():
        for defence in ["none", *noise]:
            for r in by_defence.get(defence, []):
                lines.append(
                    f"| {split} | {defence} | {r.strength:g} | {100 * r.accuracy:.1f}% | "
                    f"{r.accuracy_drop:.1f} | {r.max_ssim:.3f} |"
                )
    intro = f"Lowest max SSIM within an accuracy budget, and the smallest strength below SSIM {RECOGNISABLE_SSIM:g}:"
    lines += ["", intro, ""]
    head = " | ".join(f"≤ {b:g} point{'s' if b != 1 else ''}" for b in budgets)
    lines += [f"| split | defence | {head} | strength for SSIM < {RECOGNISABLE_SSIM:g} (its drop) |"]
    lines += ["|---" * (3 + len(budgets)) + "|"]
    for split, by_defence in by_split.items():
        for defence in noise:
            rows = by_defence.get(defence, [])
            cells = []
            for budget in budgets:
                best = lowest_ssim_within(rows, budget)
                cells.append("–" if best is None else f"{best:.3f}")
            private = [r for r in rows if r.max_ssim < RECOGNISABLE_SSIM]
            needed = "not reached" if not private else f"{private[0].strength:g} ({private[0].accuracy_drop:.1f})"
            lines.append(f"| {split} | {defence} | {' | '.join(cells)} | {needed} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("table", type=Path, help="a sweep's sweep.json")
    parser.add_argument("--budget", type=float, action="append", help="accuracy budgets in points (default 1, 5)")
    args = parser.parse_args()
    print(report(read_json(args.table), args.budget or [1.0, 5.0]))


if __name__ == "__main__":
    main()
