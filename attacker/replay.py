"""Replay a capture offline (`splitleak attack`): invert its activations with one attack and score the reconstructions.

The attacker has the capture (splitleak.core.capture), the exported model folder pulled out of the app (its
heads, and the manifest that says how frames are normalised), and, for attacks that train, auxiliary images of the
same kind: by default the *train* split of the data set the victim's frames come from, which are drawn from the test
split, so no victim frame is ever trained on; attacks that train through the cloud's classifier (`shadow`) also get
their labels. Knobs are read off each attack's constructor, so `--help` lists them all and a new attack's knobs need
no code here.

Writes, per served model (NAME.SPLIT) in the capture, `reconstructions.png` and `summary.json` under --out.
"""

from __future__ import annotations

import argparse
import inspect
import time
from pathlib import Path

import numpy as np

from splitleak.attacker import scoring
from splitleak.attacker.attacks import ATTACKS, build
from splitleak.core import capture as capture_format
from splitleak.core import data, manifest
from splitleak.core.facts import IDENTITY_DATASETS

# What an attack is given rather than tuned with: the CLI fills these in, never the user.
KNOWLEDGE = ("manifest", "split", "auxiliary", "auxiliary_labels", "progress")


def knobs_of(attack: str) -> dict[str, inspect.Parameter]:
    """The keyword-only knobs of an attack's constructor, less the knowledge the CLI fills in."""
    parameters = inspect.signature(ATTACKS[attack]).parameters
    return {name: p for name, p in parameters.items() if p.kind is p.KEYWORD_ONLY and name not in KNOWLEDGE}


def auxiliary_images(dataset: str, m: manifest.Manifest, limit: int | None, seed: int = 0) -> np.ndarray:
    """`limit` train-split images of `dataset` drawn at random (the shared sets are stored grouped by class)."""
    return auxiliary_set(dataset, m, limit, seed)[0]


def auxiliary_set(
    dataset: str, m: manifest.Manifest, limit: int | None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray | None]:
    """The images of `auxiliary_images` and their labels as the model's class indices, or None for labels when the
    data set's classes are not the model's (an attacker's photos of other things have no label the tail knows)."""
    ds = data.load(dataset, "train")
    indices = np.sort(np.random.default_rng(seed).permutation(len(ds))[:limit])
    images = data.resize(ds.images[indices], m.input_shape[1], m.input_shape[0])
    return images, ds.labels[indices] if tuple(ds.classes) == m.classes else None


def knowledge(
    attack: str, m: manifest.Manifest, split: str, *, aux_dataset: str | None, aux_limit: int | None, seed: int = 0
) -> dict:
    """What `attack` is given to know (KNOWLEDGE, less `progress`): the model and split point, and, for an attack that
    trains on auxiliary images, `aux_limit` of `aux_dataset`'s train split, with their labels where it needs them."""
    parameters = inspect.signature(ATTACKS[attack]).parameters
    given: dict = {"manifest": m, "split": split}
    if "auxiliary" in parameters:
        if aux_dataset is None:
            raise ValueError(f"{attack} trains on auxiliary images: the capture names no data set, so give one")
        given["auxiliary"], labels = auxiliary_set(aux_dataset, m, aux_limit, seed)
        if "auxiliary_labels" in parameters:
            if labels is None:
                raise ValueError(
                    f"{attack} trains through the model's classifier, so its auxiliary images need the model's labels, "
                    f"but {aux_dataset}'s classes are not {m.name}'s"
                )
            given["auxiliary_labels"] = labels
    return given


def replay(
    capture: capture_format.Capture,
    served_name: str,
    attack: str,
    *,
    model_dir: Path,
    aux_dataset: str | None = None,
    aux_limit: int | None = None,
    limit: int | None = None,
    knobs: dict | None = None,
    progress: bool = False,
) -> dict:
    """Invert the activations that `capture` holds for `served_name` and score them against the originals.

    Returns {"originals", "reconstructions", "per_image", "summary"}; the summary also says what ran and how long."""
    m = manifest.load(model_dir)
    name, split = served_name.rsplit(".", 1)
    if name != m.name:
        raise ValueError(f"{model_dir} holds {m.name}, but the capture's requests are for {name}")
    frame_ids, activations = capture.activations(served_name)
    known = frame_ids >= 0  # a request that named no single frame cannot be scored against its original
    frame_ids, activations = frame_ids[known][:limit], activations[known][:limit]
    if not len(frame_ids):
        raise ValueError(f"{capture.path} has no requests for {served_name} that name their frame")
    dataset = capture.meta.get("dataset")
    originals = capture.originals(frame_ids, m)  # fails now, not after training, if the capture names no data set
    aux_dataset = aux_dataset or dataset
    given = dict(knobs or {}, **knowledge(attack, m, split, aux_dataset=aux_dataset, aux_limit=aux_limit))
    if "progress" in inspect.signature(ATTACKS[attack]).parameters:
        given["progress"] = progress

    start = time.perf_counter()
    attacker = build(attack, **given)
    built = time.perf_counter()
    reconstructions = attacker.invert(activations)
    inverted = time.perf_counter()

    test = data.load(dataset, "test")
    labels = test.labels[frame_ids] if tuple(test.classes) == m.classes else None
    faces = dataset in IDENTITY_DATASETS
    scores = scoring.score(
        originals,
        reconstructions,
        manifest=m,
        split=split,
        labels=labels,
        identities=test.labels[frame_ids] if faces else None,
        gallery=data.load(dataset, "train") if faces else None,
    )
    scores["per_image"]["frame_id"] = frame_ids
    summary = {
        "attack": attack,
        "knowledge": attacker.knowledge,
        "model": served_name,
        "split": split,
        "capture": str(capture.path),
        "dataset": dataset,
        "knobs": knobs or {},
        "auxiliary": None if "auxiliary" not in given else {"dataset": aux_dataset, "images": len(given["auxiliary"])},
        **scores["summary"],
        "seconds_build": built - start,
        "seconds_invert": inverted - built,
        "frames_per_s": len(activations) / max(inverted - built, 1e-9),
    }
    return {
        "originals": originals,
        "reconstructions": reconstructions,
        "per_image": scores["per_image"],
        "summary": summary,
    }


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capture", type=Path, required=True, help="a capture folder (splitleak attacker proxy)")
    parser.add_argument("--attack", required=True, choices=list(ATTACKS))
    parser.add_argument("--model", help="the served model NAME.SPLIT to attack; default: every one in the capture")
    parser.add_argument("--model-dir", type=Path, help="the exported model; default: CACHE/models/NAME")
    parser.add_argument("--aux-dataset", help="auxiliary images' data set (train split); default: the capture's")
    parser.add_argument("--aux-limit", type=int, help="use this many auxiliary images, drawn at random")
    parser.add_argument("--limit", type=int, help="invert the first N captured frames only")
    parser.add_argument("--out", type=Path, help="default: CAPTURE.ATTACK next to the capture")
    knobs = parser.add_argument_group("attack knobs (each attack takes its own; defaults per attack)")
    seen: dict[str, dict[str, object]] = {}
    for attack in ATTACKS:
        for name, p in knobs_of(attack).items():
            seen.setdefault(name, {})[attack] = p.default
    for name, defaults in seen.items():
        example = next(iter(defaults.values()))
        kind = {"action": argparse.BooleanOptionalAction} if isinstance(example, bool) else {"type": type(example)}
        knobs.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            default=argparse.SUPPRESS,
            **kind,
            help=", ".join(f"{attack}: {default}" for attack, default in defaults.items()),
        )
    return parser


def main(args: argparse.Namespace) -> int:
    allowed = knobs_of(args.attack)
    knobs = {name: getattr(args, name) for name in allowed if hasattr(args, name)}
    foreign = sorted(
        name for attack in ATTACKS for name in knobs_of(attack) if hasattr(args, name) and name not in allowed
    )
    if foreign:
        raise SystemExit(
            f"{args.attack} has no knob {', '.join('--' + n.replace('_', '-') for n in foreign)}; "
            f"its knobs: {', '.join('--' + n.replace('_', '-') for n in allowed) or 'none'}"
        )
    capture = capture_format.read(args.capture)
    models = [args.model] if args.model else capture.models()
    if not models:
        raise SystemExit(f"{args.capture} holds no requests")
    out = args.out or args.capture.resolve().with_name(f"{args.capture.resolve().name}.{args.attack}")
    for served_name in models:
        model_dir = args.model_dir or data.cache_dir() / "models" / served_name.rsplit(".", 1)[0]
        result = replay(
            capture,
            served_name,
            args.attack,
            model_dir=model_dir,
            aux_dataset=args.aux_dataset,
            aux_limit=args.aux_limit,
            limit=args.limit,
            knobs=knobs,
            progress=True,
        )
        paths = scoring.write_report(
            out / served_name, result["originals"], result["reconstructions"], result["per_image"], result["summary"]
        )
        summary = result["summary"]
        print(f"{args.attack} on {served_name} ({summary['knowledge']})")
        print(scoring.format_summary(summary))
        print(f"inverted at {summary['frames_per_s']:.1f} frames/s after {summary['seconds_build']:.1f} s to build")
        print(f"wrote {paths['grid']} and {paths['summary']}")
    return 0
