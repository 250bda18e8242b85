"""The sweep's plots (matplotlib, each as PNG and SVG), drawn from the rows of `splitleak sweep`'s table.

- `latency`: for each link, the undefended model's median latency per split point, stacked by stage (device,
  uplink, cloud, downlink, transport), as Neurosurgeon breaks it down (Kang et al., ASPLOS 2017, Figure 3);
- `leakage`: for each attack, its mean SSIM and PSNR per split point, undefended;
- `tradeoff`: accuracy against the strongest attack's SSIM, one colour per defence, with the Pareto front (no other
  configuration is both more accurate and less leaky) marked.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

from splitleak.core.facts import RECOGNISABLE_SSIM  # noqa: E402
from splitleak.study.rows import LATENCY_STAGES, SweepRow  # noqa: E402

STAGE_COLOURS = {
    "device": "#4c72b0",
    "uplink": "#dd8452",
    "cloud": "#55a868",
    "downlink": "#c44e52",
    "transport": "#8c8c8c",
}


def write_all(table: list[SweepRow], out: Path) -> list[Path]:
    written = []
    for name, draw in (("latency", latency), ("leakage", leakage), ("tradeoff", tradeoff)):
        figure = draw(table)
        for suffix in ("png", "svg"):
            path = out / f"{name}.{suffix}"
            figure.savefig(path, dpi=120, bbox_inches="tight")
            written.append(path)
        plt.close(figure)
    return written


def _undefended(table: list[SweepRow]) -> list[SweepRow]:
    return [r for r in table if r.defence == "none" and not r.training_time]


def _splits(rows: list[SweepRow]) -> list[str]:
    return list(dict.fromkeys(r.split for r in rows))


def latency(table: list[SweepRow]) -> plt.Figure:
    rows = _undefended(table)
    links = list(dict.fromkeys(r.link for r in rows))
    figure, axes = plt.subplots(1, len(links), figsize=(4.2 * len(links), 3.8), squeeze=False, layout="constrained")
    for ax, name in zip(axes[0], links, strict=True):
        here = [r for r in rows if r.link == name]
        splits = _splits(here)
        bottom = [0.0] * len(splits)
        for stage in LATENCY_STAGES:
            values = [next(r.latency_ms[stage].median for r in here if r.split == s) for s in splits]
            ax.bar(splits, values, bottom=bottom, label=stage, color=STAGE_COLOURS[stage])
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
        ax.set_title(f"link: {name}")
        ax.set_xlabel("split point")
        ax.set_ylabel("median latency per frame (ms)")
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.suptitle("Latency by stage, undefended")
    return figure


def leakage(table: list[SweepRow]) -> plt.Figure:
    rows = [r for r in _undefended(table) if r.link == table[0].link]
    splits = _splits(rows)
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.8), layout="constrained")
    for attack in table[0].attacks:
        by_split = {r.split: r.attacks[attack] for r in rows}
        left.plot(splits, [by_split[s].ssim for s in splits], marker="o", label=attack)
        right.plot(splits, [by_split[s].psnr for s in splits], marker="o", label=attack)
    recognisable = f"SSIM {RECOGNISABLE_SSIM:g} (recognisable)"
    left.axhline(RECOGNISABLE_SSIM, color="grey", linestyle="--", linewidth=1, label=recognisable)
    left.set(xlabel="split point", ylabel="mean SSIM", ylim=(0, 1), title="SSIM of the reconstructions")
    right.set(xlabel="split point", ylabel="mean PSNR (dB)", title="PSNR of the reconstructions")
    left.legend()
    figure.suptitle("What each attack recovers, undefended")
    return figure


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the (ssim, accuracy) points no other point beats on both (lower SSIM, higher accuracy), by SSIM."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def tradeoff(table: list[SweepRow]) -> plt.Figure:
    rows = [r for r in table if r.link == table[0].link]
    figure, ax = plt.subplots(figsize=(7.5, 4.5), layout="constrained")
    markers = dict(zip(_splits(rows), "osD^vP*X", strict=False))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, defence in enumerate(dict.fromkeys(r.defence for r in rows)):
        for r in (r for r in rows if r.defence == defence):
            ax.scatter(r.max_ssim, 100 * r.accuracy, color=colours[i % len(colours)], marker=markers[r.split])
        ax.scatter([], [], color=colours[i % len(colours)], label=defence)
    for split, marker in markers.items():
        ax.scatter([], [], color="black", marker=marker, label=f"split {split}")
    points = [(r.max_ssim, 100 * r.accuracy) for r in rows]
    front = [points[i] for i in pareto_front(points)]
    ax.step(
        [p[0] for p in front], [p[1] for p in front], where="post", color="black", linewidth=1, label="Pareto front"
    )
    ax.axvline(RECOGNISABLE_SSIM, color="grey", linestyle="--", linewidth=1)
    ax.set(xlabel="SSIM of the strongest attack (lower is more private)", ylabel="accuracy (%)")
    ax.set_title("Accuracy against leakage, every split, defence and strength")
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    return figure
