"""The sweep's plots (matplotlib, each as PNG and SVG), drawn from the rows of `splitleak sweep`'s table.

- `latency`: for each link, the undefended model's median latency per split point, stacked by stage (device,
  uplink, cloud, downlink, transport), as Neurosurgeon breaks it down (Kang et al., ASPLOS 2017, Figure 3);
- `leakage`: for each attack, its mean SSIM and PSNR per split point, undefended;
- `tradeoff`: accuracy against the strongest attack's SSIM, one colour per defence, with the Pareto front (no other
  configuration is both more accurate and less leaky) marked;
- `best_split` (a sweep over several device profiles): the split `splitleak recommend` picks for each device and link,
  as Neurosurgeon shows the best partition moving with the device and the network (Kang et al., Figures 9 and 10).

The first three draw the first device's rows (a slower device changes the latency alone).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

from splitleak.core.facts import RECOGNISABLE_SSIM  # noqa: E402
from splitleak.study.recommend import recommend  # noqa: E402
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
    host = [r for r in table if r.device == table[0].device]
    drawings = [("latency", latency, host), ("leakage", leakage, host), ("tradeoff", tradeoff, host)]
    if len({r.device for r in table}) > 1:
        drawings.append(("best_split", best_split, table))
    for name, draw, rows in drawings:
        figure = draw(rows)
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


def best_splits(
    table: list[SweepRow], max_ssim: float = RECOGNISABLE_SSIM, max_drop: float = 1.0
) -> dict[tuple[str, str], SweepRow | None]:
    """(device, link) -> the row `splitleak recommend` picks with these bounds (None when none meets them)."""
    devices = list(dict.fromkeys(r.device for r in table))
    links = list(dict.fromkeys(r.link for r in table))
    return {
        (d, n): recommend(table, link_name=n, device=d, max_ssim=max_ssim, max_drop=max_drop).best
        for d in devices
        for n in links
    }


def best_split(table: list[SweepRow]) -> plt.Figure:
    """Two panels: the split chosen on latency alone (Neurosurgeon's, every attack allowed) and within the privacy
    bound (`splitleak recommend`'s defaults)."""
    devices = list(dict.fromkeys(r.device for r in table))
    links = list(dict.fromkeys(r.link for r in table))
    splits = _splits(table)
    size = (2 * (1.5 * len(links) + 1.5), 0.8 * len(devices) + 1.8)
    figure, axes = plt.subplots(1, 2, figsize=size, layout="constrained", sharey=True)
    panels = (("latency alone (any SSIM)", 1.0), (f"every attack's SSIM <= {RECOGNISABLE_SSIM:g}", RECOGNISABLE_SSIM))
    for ax, (title, max_ssim) in zip(axes, panels, strict=True):
        best = best_splits(table, max_ssim=max_ssim)
        grid = [[splits.index(best[d, n].split) if best[d, n] else -1 for n in links] for d in devices]
        ax.imshow(grid, cmap="Pastel1", vmin=-1, vmax=8, aspect="auto")
        for i, d in enumerate(devices):
            for j, n in enumerate(links):
                row = best[d, n]
                text = (
                    "none" if row is None else f"{row.split}\n{row.defence} {row.strength:g}\n{row.total_ms():.0f} ms"
                )
                ax.text(j, i, text, ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(links)), links)
        ax.set_yticks(range(len(devices)), devices)
        ax.set(xlabel="link", title=title)
    axes[0].set_ylabel("device (fastest first)")
    figure.suptitle("The fastest split and defence by device and link (accuracy drop <= 1 point)")
    return figure
