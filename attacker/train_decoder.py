"""Train the black-box decoder for split points of a model and export each to ONNX (`splitleak attacker train-decoder`).

Each is the `decoder` attack (splitleak.attacker.attacks.decoder, He et al. 2019) trained with the given knobs on
auxiliary images, the train split of --aux-dataset, then exported as `SPLIT.decoder.onnx` with one input,
`activation` (batch first, as intercepted), and one output, `reconstruction` (N, H, W, C in [0, 1], as
`Attack.invert` returns it). The live attacker (splitleak.attacker.live) runs these files with ONNX Runtime, no torch.

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
from splitleak.attacker.attacks import build
from splitleak.attacker.attacks.base import query, session
from splitleak.attacker.replay import auxiliary_images, knobs_of
from splitleak.core import data, manifest
from splitleak.model.export import export_onnx

ATTACK = "decoder"


class ChannelsLast(nn.Module):
    """The decoder with its output in NHWC, the layout reconstructions have everywhere else."""

    def __init__(self, decoder: nn.Module) -> None:
        super().__init__()
        self.decoder = decoder

    def forward(self, activation: torch.Tensor) -> torch.Tensor:
        return self.decoder(activation).permute(0, 2, 3, 1)  # (B, H, W, C)


def held_out_frames(dataset: str, m: manifest.Manifest, limit: int, seed: int = 0) -> np.ndarray:
    """`limit` test-split frames drawn at random, as the device draws them: never among the auxiliary images."""
    test = data.load(dataset, "test")
    indices = np.random.default_rng(seed).permutation(len(test))[:limit]
    return data.resize(test.images[indices], m.input_shape[1], m.input_shape[0])


def train_and_export(
    m: manifest.Manifest,
    split: str,
    out: Path,
    *,
    auxiliary: np.ndarray,
    aux_dataset: str,
    held_out: np.ndarray,
    knobs: dict,
    command: str,
    progress: bool = False,
) -> dict:
    """Train the decoder for `split`, export it to `out` and score the exported file; returns its metadata."""
    start = time.perf_counter()
    attack = build(ATTACK, manifest=m, split=split, auxiliary=auxiliary, progress=progress, **knobs)
    seconds = time.perf_counter() - start
    example = torch.zeros(2, *attack.split.activation_shape)
    out.parent.mkdir(parents=True, exist_ok=True)
    export_onnx(ChannelsLast(attack.decoder), example, out, "activation", "reconstruction")

    inverse = live.ExportedInverse(out)
    reconstructions = inverse.invert(query(session(attack.split.head), m, held_out))
    metadata = {
        "attack": ATTACK,
        "knowledge": attack.knowledge,
        "model": m.name,
        "split": split,
        "head_sha256": manifest.sha256(attack.split.head),
        "auxiliary": json.dumps({"dataset": f"{aux_dataset} (train)", "images": len(auxiliary)}),
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
    parser.add_argument("--split", action="append", help="a split point (again for more); default: every one")
    parser.add_argument("--aux-dataset", help="auxiliary images: this data set's train split; default: the model's")
    parser.add_argument("--aux-limit", type=int, help="train on this many auxiliary images, drawn at random")
    parser.add_argument("--held-out", type=int, default=500, help="test-split frames to score the exported file on")
    parser.add_argument("--out", type=Path, help=f"folder for SPLIT.{ATTACK}.onnx; default: MODEL_DIR/attacks")
    knobs = parser.add_argument_group("decoder knobs")
    for name, p in knobs_of(ATTACK).items():
        knobs.add_argument(f"--{name.replace('_', '-')}", dest=name, type=type(p.default), default=p.default)
    return parser


def main(args: argparse.Namespace) -> int:
    m = manifest.load(args.model_dir)
    splits = args.split or list(m.splits)
    for split in splits:
        m.split(split)  # an unknown split fails now, not after the first one has trained
    aux_dataset = args.aux_dataset or m.dataset
    auxiliary = auxiliary_images(aux_dataset, m, args.aux_limit)
    held_out = held_out_frames(aux_dataset, m, args.held_out)
    knobs = {name: getattr(args, name) for name in knobs_of(ATTACK)}
    out_dir = args.out or args.model_dir / live.ATTACKS_FOLDER
    for split in splits:
        command = ["splitleak", "attacker", "train-decoder", "--model-dir", str(args.model_dir), "--split", split]
        command += ["--aux-dataset", aux_dataset, *(["--aux-limit", str(args.aux_limit)] if args.aux_limit else [])]
        command += [f"--{name.replace('_', '-')}={value}" for name, value in knobs.items()]
        out = out_dir / f"{split}.{ATTACK}.onnx"
        metadata = train_and_export(
            m,
            split,
            out,
            auxiliary=auxiliary,
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
