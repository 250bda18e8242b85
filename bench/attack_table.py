"""The attack table: every attack on every captured split point of a model, beside He et al.'s figures.

Each row replays the capture with one attack (splitleak.attacker.replay, as `splitleak attack` does) and reports
PSNR and SSIM (mean ± std over the frames), the share of recognisable frames (SSIM >= 0.3), label leakage, and what
the attack cost (see `cells`). For He et al.'s CNN on CIFAR-10 (`hecnn`), the paper's own figures for the same split
point stand beside ours:

- rmle: Table 3 (white box);
- decoder: Table 4, "same dist" (the inverse network trained on other images of the target's training
  distribution). `decoder` trains on the train split by default, the target's own training set: Table 4's "same
  set" row, 49.88, 19.81 and 15.42 dB (SSIM 0.9993, 0.6939, 0.3124), is within 1.5 dB of these;
- shadow: Table 6, "same set, same net";
- datafree: none (Dong et al. attack other networks, and the He CNN has no batch norm for it to start from).

He, Zhang and Lee, "Model inversion attacks against collaborative inference", ACSAC 2019. Hours at the paper's
settings (rmle: 5000 steps per frame); `--limit` and the knobs make a quick version:

    .venv/bin/python bench/attack_table.py --model-dir CACHE/models/hecnn-cifar10 --capture CAPTURE \\
        --attack rmle --attack decoder --limit 100 --knob rmle.steps=500 --out attack-table.md
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

from splitleak.attacker import scoring
from splitleak.attacker.attacks import ATTACKS
from splitleak.attacker.replay import replay
from splitleak.core import capture, manifest

# (attack, split point) -> (PSNR dB, SSIM) that He et al. report for CIFAR-10 on their CNN, our `hecnn`.
PAPER = {
    ("rmle", "conv11"): (37.59, 0.9960),
    ("rmle", "relu22"): (19.47, 0.6940),
    ("rmle", "relu32"): (13.38, 0.1625),
    ("decoder", "conv11"): (49.02, 0.999),
    ("decoder", "relu22"): (19.36, 0.680),
    ("decoder", "relu32"): (13.95, 0.220),
    ("shadow", "conv11"): (21.16, 0.9104),
    ("shadow", "relu22"): (12.74, 0.1752),
    ("shadow", "relu32"): (11.09, 0.0419),
}
PAPER_MODEL = ("hecnn", "cifar10")
COLUMNS = (
    "split",
    "attack",
    "frames",
    "PSNR dB",
    "SSIM",
    "recognisable",
    "label leakage",
    "paper PSNR",
    "paper SSIM",
    "build s",
    "invert s/frame",
)


def cells(summary: dict, paper: tuple[float, float] | None) -> list[str]:
    """One row of the table from a replay summary (`summary.json`): scores, then cost. `build s` is what the attack
    spent before it could invert (training, or nothing), once per split point; `invert s/frame` is the inversion's
    wall time over the frames, inverted together in one call."""
    s = summary
    return [
        s["split"],
        s["attack"],
        str(s["frames"]),
        f"{s['psnr_mean']:.2f} ± {s['psnr_std']:.2f}",
        f"{s['ssim_mean']:.3f} ± {s['ssim_std']:.3f}",
        f"{s['recognisable']:.0%}",
        f"{s['label_leakage']:.0%}",
        f"{paper[0]:.2f}" if paper else "–",
        f"{paper[1]:.4f}" if paper else "–",
        f"{s['seconds_build']:.0f}",
        f"{s['seconds_invert'] / s['frames']:.3g}",
    ]


def table(
    model_dir: Path,
    captures: list[Path],
    attacks: list[str],
    *,
    limit: int | None = None,
    aux_limit: int | None = None,
    knobs: dict[str, dict] | None = None,
    reports: Path | None = None,
) -> str:
    """A markdown table with one row per (split point, attack), split points in the model's order."""
    m = manifest.load(model_dir)
    rows = []
    for path in captures:
        tapped = capture.read(path)
        for served in tapped.models():
            name, split = served.rsplit(".", 1)
            if name != m.name:
                continue
            for attack in attacks:
                result = replay(
                    tapped,
                    served,
                    attack,
                    model_dir=model_dir,
                    aux_dataset=None,
                    aux_limit=aux_limit,
                    limit=limit,
                    knobs=(knobs or {}).get(attack),
                    progress=True,
                )
                s = result["summary"]
                if reports is not None:
                    scoring.write_report(
                        reports / f"{served}.{attack}",
                        result["originals"],
                        result["reconstructions"],
                        result["per_image"],
                        s,
                    )
                paper = PAPER.get((attack, split)) if (m.model, m.dataset) == PAPER_MODEL else None
                rows.append((list(m.splits).index(split), attacks.index(attack), cells(s, paper)))
    if not rows:
        raise ValueError(f"no capture holds requests for {m.name}")
    lines = [
        f"{m.name}, captures: {', '.join(str(p) for p in captures)}",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    lines += ["| " + " | ".join(cells) + " |" for *_, cells in sorted(rows, key=lambda r: r[:2])]
    return "\n".join(lines) + "\n"


def parse_knob(text: str) -> tuple[str, str, object]:
    """`ATTACK.KNOB=VALUE` -> (attack, knob, value), the value read as a Python literal."""
    target, _, value = text.partition("=")
    attack, _, knob = target.partition(".")
    if attack not in ATTACKS or knob not in ATTACKS[attack].knob_types():
        raise argparse.ArgumentTypeError(f"{target!r} is not ATTACK.KNOB of a known attack")
    return attack, knob, ast.literal_eval(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, required=True)
    parser.add_argument("--capture", type=Path, action="append", required=True, help="repeat for several")
    parser.add_argument("--attack", action="append", choices=list(ATTACKS), help="repeat; default: every attack")
    parser.add_argument("--limit", type=int, help="frames per split point")
    parser.add_argument("--aux-limit", type=int, help="auxiliary images for the attacks that train")
    parser.add_argument("--knob", type=parse_knob, action="append", default=[], help="ATTACK.KNOB=VALUE, repeat")
    parser.add_argument("--reports", type=Path, help="also write each row's grid and summary.json here")
    parser.add_argument("--out", type=Path, help="write the table here too")
    args = parser.parse_args()
    knobs: dict[str, dict] = {}
    for attack, knob, value in args.knob:
        knobs.setdefault(attack, {})[knob] = value
    text = table(
        args.model_dir,
        args.capture,
        args.attack or list(ATTACKS),
        limit=args.limit,
        aux_limit=args.aux_limit,
        knobs=knobs,
        reports=args.reports,
    )
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
