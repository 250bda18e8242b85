"""Train an attack for split points of a model and export it to ONNX (`splitleak attacker train-decoder`).

An attack whose inverse is one network declares itself `exportable` (splitleak.attacker.attacks.base): the decoder
(splitleak.attacker.attacks.decoder, He et al. 2019), which is the default, or one a plugin registers. Each is built
with the given knobs, and with auxiliary images (the train split of --aux-dataset) where it declares that it needs
them, then exported as `SPLIT.ATTACK.onnx` with one input, `activation` (batch first, as intercepted), and one output,
`reconstruction` (N, H, W, C in [0, 1], as `Attack.invert` returns it). The live attacker (splitleak.attacker.live)
runs these files with ONNX Runtime, no torch, so the demo shows every attack exported here.

Each file's metadata says what the live attacker shows and checks (see splitleak.attacker.live.METADATA): the attack
and what it knows, the model, split and sha256 of the head it inverts, the knobs, the command that reproduces it,
and its PSNR and SSIM on frames of the test split that it never saw, scored through the exported file itself.
"""

from __future__ import annotations

import argparse
import json
import shlex
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from splitleak.attacker import live, scoring
from splitleak.attacker.attacks import ATTACKS, build
from splitleak.attacker.attacks.base import query, session
from splitleak.attacker.replay import add_aux_limit_argument, add_knob_arguments, knobs_from_args, knowledge, option
from splitleak.core import data, manifest
from splitleak.model.export import export_onnx

DEFAULT_ATTACK = "decoder"


class ChannelsLast(nn.Module):
    """An attack's network with its output in NHWC, the layout reconstructions have everywhere else."""

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, activation: torch.Tensor) -> torch.Tensor:
        return self.network(activation).permute(0, 2, 3, 1)  # (B, H, W, C)


def exportable() -> list[str]:
    return [name for name, cls in ATTACKS.items() if cls.exportable]


def held_out_frames(dataset: str, m: manifest.Manifest, limit: int, seed: int = 0) -> np.ndarray:
    """`limit` test-split frames drawn at random, as the device draws them: never among the auxiliary images."""
    test = data.load(dataset, "test")
    indices = np.random.default_rng(seed).permutation(len(test))[:limit]
    return data.resize(test.images[indices], m.input_shape[1], m.input_shape[0])


def train_and_export(
    attack_name: str,
    given: dict,
    out: Path,
    *,
    aux_dataset: str,
    held_out: np.ndarray,
    knobs: dict,
    command: str,
    progress: bool = False,
) -> dict:
    """Build `attack_name` with what it is `given` to know and `knobs`, export it to `out` and score the exported
    file; returns its metadata."""
    start = time.perf_counter()
    attack = build(attack_name, **given, **knobs, progress=progress)
    seconds = time.perf_counter() - start
    m = attack.manifest
    example = torch.zeros(2, *attack.split.activation_shape)
    out.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(ChannelsLast(attack.network()), example, out, "activation", "reconstruction")

    inverse = live.ExportedInverse(out)
    reconstructions = inverse.invert(query(session(attack.split.head), m, held_out))
    auxiliary = given.get("auxiliary")
    metadata = {
        "attack": attack_name,
        "knowledge": attack.knowledge,
        "model": m.name,
        "split": attack.split.name,
        "head_sha256": manifest.sha256(attack.split.head),
        "auxiliary": json.dumps(
            None if auxiliary is None else {"dataset": f"{aux_dataset} (train)", "images": len(auxiliary)}
        ),
        "knobs": json.dumps(knobs, sort_keys=True),
        "command": command,
        "train_seconds": f"{seconds:.0f}",
        "held_out_frames": str(len(held_out)),
        "psnr": f"{np.mean(scoring.psnr(held_out, reconstructions)):.2f}",
        "ssim": f"{np.mean(scoring.ssim(held_out, reconstructions)):.4f}",
    }
    model = onnx.load(out)
    onnx.helper.set_model_props(model, metadata)
    onnx.save(model, out)
    return metadata


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model-dir", type=Path, default=manifest.DEFAULT_MODEL_DIR, help="default: the shipped ResNet-20"
    )
    parser.add_argument("--attack", default=DEFAULT_ATTACK, choices=exportable(), help="an exportable attack")
    parser.add_argument("--split", action="append", help="a split point (again for more); default: every one")
    parser.add_argument("--aux-dataset", help="auxiliary images: this data set's train split; default: the model's")
    add_aux_limit_argument(parser)
    parser.add_argument("--held-out", type=int, default=500, help="test-split frames to score the exported file on")
    parser.add_argument("--out", type=Path, help="folder for SPLIT.ATTACK.onnx; default: MODEL_DIR/attacks")
    add_knob_arguments(parser, exportable())
    return parser


def main(args: argparse.Namespace) -> int:
    # A ValueError is one line and exit 2 (splitleak.cli).
    knobs = {**ATTACKS[args.attack].knob_defaults(), **knobs_from_args(args, args.attack)}
    m = manifest.load(args.model_dir)
    splits = args.split or list(m.splits)
    for split in splits:
        m.split(split)  # an unknown split fails now, not after the first one has trained
    aux_dataset = args.aux_dataset or m.dataset
    # What the attack knows but the split point is the same for every split: its auxiliary images are drawn once.
    known = knowledge(args.attack, m, splits[0], aux_dataset=aux_dataset, aux_limit=args.aux_limit)
    held_out = held_out_frames(aux_dataset, m, args.held_out)
    out_dir = args.out or args.model_dir / live.ATTACKS_FOLDER
    for split in splits:
        command = ["splitleak", "attacker", "train-decoder", "--model-dir", str(args.model_dir), "--split", split]
        command += [] if args.attack == DEFAULT_ATTACK else ["--attack", args.attack]
        command += ["--aux-dataset", aux_dataset, *(["--aux-limit", str(args.aux_limit)] if args.aux_limit else [])]
        command += [f"{option(name)}={value}" for name, value in knobs.items()]
        out = out_dir / f"{split}.{args.attack}.onnx"
        metadata = train_and_export(
            args.attack,
            dict(known, split=split),
            out,
            aux_dataset=aux_dataset,
            held_out=held_out,
            knobs=knobs,
            command=shlex.join(command),
            progress=True,
        )
        print(
            f"{out}: PSNR {metadata['psnr']} dB, SSIM {metadata['ssim']} on {len(held_out)} held-out frames "
            f"({metadata['train_seconds']} s to train, {out.stat().st_size / 1024:.0f} KiB)",
            flush=True,
        )
    return 0
