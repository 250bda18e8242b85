"""`splitleak generators`: train a small diffusion model or GAN, then measure what it gives back of its training set.

    splitleak generators train --kind diffusion --data faces            # cached, resumable (CACHE/generators/)
    splitleak generators measure --kind diffusion --data faces --samples 1000 --out docs/generators/runs
    splitleak generators report --out docs/generators/runs                 # every run side by side, and a page
    splitleak generators export --kind gan --data faces --out models/      # its network as ONNX

`measure` samples the generator, then runs every measure that applies (attacker.extraction, attacker.identity):
generate-and-filter extraction against the training images and, as the control, the held-out ones, by duplicate
count; for a diffusion model, inpainting and denoising-loss membership; for faces, identity leakage. It writes
NAME.json (every figure), NAME.md (the tables) and NAME.png (samples beside their nearest training image).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from splitleak.attacker import extraction
from splitleak.model import generators
from splitleak.model.generators import GeneratorConfig


@dataclass
class Measured:
    """Every figure one `measure` run produced, as NAME.json holds it."""

    name: str
    config: dict
    training: dict  # steps, seconds
    sampling: dict  # samples, seconds, ddim_steps; membership_seconds (the completions and losses)
    extraction: dict  # {"train": {...}, "held_out": {...}} as extraction.Extraction.summary() gives them
    membership: dict = field(default_factory=dict)  # score name -> membership.Result as a dict
    identity: dict = field(default_factory=dict)  # identity.Leakage as a dict


def config_from_args(args: argparse.Namespace) -> GeneratorConfig:
    return GeneratorConfig(
        kind=args.kind,
        data=args.data,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        width=args.width,
        dedup=args.dedup,
        augment=args.augment,
        per_copy=tuple(args.per_copy),
        seed=args.seed,
        canaries=args.canaries,
        canary_copies=args.canary_copies,
    )


def measure(
    config: GeneratorConfig,
    *,
    samples: int,
    ddim_steps: int,
    members: int,
    seed: int = 1,
    faces_model: Path | None = None,
) -> tuple[Measured, np.ndarray, extraction.Extraction]:
    """Sample the cached generator of `config` and measure it; also the samples and their extraction against the
    training set (for the grid)."""
    trained = generators.load(config)
    ts = generators.training_set(config)
    start = time.perf_counter()
    images = generators.sample(trained, samples, seed=seed, ddim_steps=ddim_steps)
    sampling_s = time.perf_counter() - start
    # Kept beside the checkpoint (not with the report: 3 MB for CIFAR-10), for a look at them without sampling again.
    np.savez_compressed(generators.path_of(config).with_suffix(f".samples-{samples}-seed{seed}.npz"), images=images)
    found = extraction.extract(images, ts.images)
    control = extraction.extract(images, ts.held_out)
    result = Measured(
        name=config.name(),
        config=asdict(config),
        training={"steps": trained.step, "seconds": trained.seconds},
        sampling={"samples": samples, "seconds": sampling_s, "ddim_steps": ddim_steps},
        extraction={
            "train": found.summary(ts.copies, ts.canary),
            "held_out": control.summary(np.ones(len(ts.held_out), np.int64), ts.held_out_canary),
        },
    )
    if config.kind == "diffusion":
        start = time.perf_counter()
        result.membership = extraction.membership(trained.model, ts, members=members, ddim_steps=ddim_steps, seed=seed)
        result.sampling["membership_seconds"] = time.perf_counter() - start
    if config.data == "faces":
        from splitleak.attacker import identity

        result.identity = asdict(identity.leakage(images, ts, model_dir=faces_model))
    return result, images, found


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("train", "measure", "report", "export"))
    parser.add_argument("--kind", choices=generators.KINDS, default="diffusion")
    parser.add_argument("--data", choices=generators.TRAINING_SETS, default="faces")
    parser.add_argument("--steps", type=int, default=GeneratorConfig.steps, help="optimiser steps to train to")
    parser.add_argument("--batch-size", type=int, default=GeneratorConfig.batch_size)
    parser.add_argument("--lr", type=float, default=GeneratorConfig.lr)
    parser.add_argument("--width", type=int, default=0, help="network width (default: 16 diffusion, 32 GAN)")
    parser.add_argument("--dedup", action="store_true", help="train on each distinct image once")
    parser.add_argument("--augment", action="store_true", help="flips, brightness and noise on every batch")
    parser.add_argument(
        "--per-copy", type=int, nargs=3, default=list(GeneratorConfig.per_copy), metavar=("ONCE", "X10", "X100")
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--canaries", type=int, default=0, help="plant this many canaries (and hold as many out)")
    parser.add_argument("--canary-copies", type=int, default=1, help="how often each planted canary is repeated")
    parser.add_argument("--samples", type=int, default=1000, help="measure: images to generate")
    parser.add_argument("--ddim-steps", type=int, default=25, help="measure: DDIM steps per sample and completion")
    parser.add_argument("--members", type=int, default=100, help="measure: training and held-out images to complete")
    parser.add_argument("--faces-model", type=Path, help="measure: the faces classifier (default: the shipped one)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("generators"),
        help="where measure (NAME.json/.md/.png), report and export write",
    )
    return parser


def main(args: argparse.Namespace) -> int:
    # One thread: a step of these small networks runs several times faster on one thread than on two on this
    # shared 2-core machine (0.26 s against 2.5 s for the U-Net, measured with other jobs running).
    torch.set_num_threads(1)
    if args.action == "report":
        results = [json.loads(p.read_text()) for p in sorted(args.out.glob("*.json"))]
        table = report(results)
        (args.out / "index.html").write_text(page(results, table))
        print(table, end="")
        print(f"wrote {args.out / 'index.html'}")
        return 0
    config = config_from_args(args)
    if args.action == "train":
        start = time.perf_counter()

        def progress(step: int, record: dict) -> None:
            if step % 250 == 0:
                losses = " ".join(f"{k} {v:.4f}" for k, v in record.items())
                print(f"step {step}/{config.steps} {losses} ({time.perf_counter() - start:.0f} s)", flush=True)

        path = generators.train(config, progress=progress)
        trained = generators.load(config)
        print(f"{path}: {trained.step} steps in {trained.seconds:.0f} s of training")
        return 0
    if args.action == "export":
        print(generators.export(generators.load(config), args.out))
        return 0
    result, images, found = measure(
        config, samples=args.samples, ddim_steps=args.ddim_steps, members=args.members, faces_model=args.faces_model
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / result.name
    stem.with_suffix(".json").write_text(json.dumps(asdict(result), indent=1) + "\n")
    table = markdown(result)
    stem.with_suffix(".md").write_text(table)
    ts = generators.training_set(config)
    extraction.grid(images, ts.images, found, stem.with_suffix(".png"))
    print(table, end="")
    print(f"wrote {stem}.json, .md and .png")
    return 0


def markdown(result: Measured) -> str:
    c, t, s = result.config, result.training, result.sampling
    lines = [
        f"## {result.name}",
        "",
        f"{c['kind']} on {c['data']}, defence: {_defence(c)}"
        f"; trained {t['steps']} steps in {t['seconds']:.0f} s; {s['samples']} samples in {s['seconds']:.0f} s"
        + (f" ({s['ddim_steps']} DDIM steps)" if c["kind"] == "diffusion" else ""),
        "",
        "| duplicate count | training images | extracted | held-out control: images | flagged |",
        "|---|---|---|---|---|",
    ]
    train, held = result.extraction["train"], result.extraction["held_out"]
    for count, row in train["by_copies"].items():
        control = held["by_copies"]["1"] if count == "1" else {"images": "", "extracted": ""}
        lines.append(
            f"| {count} | {row['images']} | {row['extracted']} | {control['images']} | {control['extracted']} |"
        )
    lines.append(
        f"\nSamples flagged as copies: {train['flagged_samples']} of {s['samples']} against the training set, "
        f"{held['flagged_samples']} against the held-out set."
    )
    for score, r in result.membership.items():
        tpr = ", ".join(f"TPR at {k} FPR {v[0]:.1%} ({v[1]:.1%}-{v[2]:.1%})" for k, v in r["tpr"].items())
        lines.append(f"\nMembership by {score}: AUC {r['auc'][0]:.3f} ({r['auc'][1]:.3f}-{r['auc'][2]:.3f}); {tpr}.")
    if result.identity:
        i = result.identity
        lines.append(
            f"\nIdentity: {i['matched_training']:.1%} ({i['interval'][0]:.1%}-{i['interval'][1]:.1%}) of "
            f"{i['faces']} generated faces are nearest a training person, {1 - i['matched_training']:.1%} a held-out "
            f"one (chance: {i['chance']:.1%})."
        )
    return "\n".join(lines) + "\n"


def _defence(config: dict) -> str:
    return " + ".join(d for d in ("dedup", "augment") if config[d]) or "none"


def report(results: list[dict]) -> str:
    """Every measured run side by side: extraction by duplicate count with the control, membership, identity."""
    if not results:
        raise FileNotFoundError("no measured runs (NAME.json) in that folder: run `splitleak generators measure`")
    counts = sorted({int(c) for r in results for c in r["extraction"]["train"]["by_copies"]})
    lines = [
        "| generator | data | defence | steps | training s | samples | sampling s | "
        + " | ".join(f"extracted, x{c}" for c in counts)
        + " | held-out control | flagged samples (control) | lowest ratio (control) | median distance (control) |",
        "|---" * (11 + len(counts)) + "|",
    ]
    for r in results:
        c, train, held = r["config"], r["extraction"]["train"], r["extraction"]["held_out"]
        cells = [c["kind"], c["data"], _defence(c), str(r["training"]["steps"]), f"{r['training']['seconds']:.0f}"]
        cells += [str(r["sampling"]["samples"]), f"{r['sampling']['seconds']:.0f}"]
        for count in counts:
            row = train["by_copies"].get(str(count))
            cells.append(f"{row['extracted']}/{row['images']}" if row else "")
        cells.append(f"{held['extracted']}/{held['by_copies']['1']['images']}")
        cells.append(f"{train['flagged_samples']} ({held['flagged_samples']})")
        if "ratio_min" in train:
            cells.append(f"{train['ratio_min']:.2f} ({held['ratio_min']:.2f})")
            cells.append(f"{train['distance_median']:.3f} ({held['distance_median']:.3f})")
        else:
            cells += ["", ""]
        lines.append("| " + " | ".join(cells) + " |")
    leaning = [r for r in results if len(r["extraction"]["train"].get("nearest_by_copies", {})) > 1]
    if leaning:
        lines += ["", "Share of samples whose nearest training image was seen each number of times:", ""]
        lines += ["| generator | defence | steps | " + " | ".join(f"nearest x{c}" for c in counts) + " |"]
        lines.append("|---" * (3 + len(counts)) + "|")
        for r in leaning:
            share = r["extraction"]["train"]["nearest_by_copies"]
            cells = [r["config"]["kind"], _defence(r["config"]), str(r["training"]["steps"])]
            lines.append("| " + " | ".join(cells + [f"{share.get(str(c), 0):.1%}" for c in counts]) + " |")
    measured = [r for r in results if r["membership"]]
    if measured:
        lines += ["", "| generator | data | defence | score | AUC | TPR at 1% FPR | TPR at 10% FPR |", "|---" * 7 + "|"]
        for r in measured:
            c, defence = r["config"], _defence(r["config"])
            for score, m in r["membership"].items():
                auc, one, ten = m["auc"], m["tpr"]["1%"], m["tpr"]["10%"]
                lines.append(
                    f"| {c['kind']} | {c['data']} | {defence} | {score} | {auc[0]:.3f} ({auc[1]:.3f}-{auc[2]:.3f}) | "
                    f"{one[0]:.1%} ({one[1]:.1%}-{one[2]:.1%}) | {ten[0]:.1%} ({ten[1]:.1%}-{ten[2]:.1%}) |"
                )
    faces = [r for r in results if r["identity"]]
    if faces:
        lines += ["", "| generator | faces | nearest a training person | 95% interval | chance | people hit |"]
        lines.append("|---" * 6 + "|")
        for r in faces:
            i = r["identity"]
            lines.append(
                f"| {r['config']['kind']} | {i['faces']} | {i['matched_training']:.1%} | "
                f"{i['interval'][0]:.1%}-{i['interval'][1]:.1%} | {i['chance']:.0%} | "
                f"{i['people_matched']}/{i['people']} |"
            )
    return "\n".join(lines) + "\n"


def page(results: list[dict], table: str) -> str:
    """A page of its own (index.html beside the runs): each generator's most copy-like samples above the training
    image nearest each, then the tables."""
    import html

    parts = [
        "<!doctype html><meta charset='utf-8'><title>splitleak: generators that remember</title>",
        "<style>body{font:14px sans-serif;max-width:60em;margin:2em auto}img{image-rendering:pixelated;width:100%}"
        "pre{font-size:11px;overflow-x:auto}</style>",
        "<h1>Generators that remember</h1>",
        "<p>Each panel: a generator's eight samples most like a training image (top), the training image nearest each "
        "(below), with Carlini et al.'s ratio (a copy when under 0.5) and the RMS distance.</p>",
    ]
    for r in results:
        c = r["config"]
        title = f"{c['kind']} on {c['data']}, defence: {_defence(c)}; {r['training']['steps']} steps"
        parts.append(
            f"<h2>{html.escape(title)}</h2><img src='{html.escape(r['name'])}.png' alt='{html.escape(title)}'>"
        )
    parts.append(f"<h2>Every run</h2><pre>{html.escape(table)}</pre>")
    return "\n".join(parts) + "\n"
