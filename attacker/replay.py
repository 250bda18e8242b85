"""Replay a capture offline (`splitleak attack`): invert its activations with one attack and score the reconstructions.

The attacker has the capture (splitleak.core.capture), the exported model folder pulled out of the app (its
heads, and the manifest that says how frames are normalised), and, for attacks that train, auxiliary images of the
same kind: by default the *train* split of the data set the victim's frames come from, which are drawn from the test
split, so no victim frame is ever trained on; attacks that train through the cloud's classifier (`shadow`) also get
their labels; an adaptive attack is told the defence with `--defence` and `--strength`. What each attack is given and
its knobs are read from its class's declarations (splitleak.attacker.attacks.base), so `--help` lists every knob and
a new attack needs no code here.

Writes, per served model (NAME.SPLIT) in the capture, `reconstructions.png` and `summary.json` under --out.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from splitleak.attacker import scoring
from splitleak.attacker.attacks import ATTACKS, build
from splitleak.core import capture as capture_format
from splitleak.core import data, defences, manifest
from splitleak.core.facts import IDENTITY_DATASETS
from splitleak.core.options import number


def auxiliary_images(dataset: str, m: manifest.Manifest, limit: int | None, seed: int = 0) -> np.ndarray:
    """`limit` train-split images of `dataset` drawn at random (the shared sets are stored grouped by class)."""
    return auxiliary_set(dataset, m, limit, seed)[0]


def auxiliary_set(
    dataset: str, m: manifest.Manifest, limit: int | None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray | None]:
    """The images of `auxiliary_images` and their labels as the model's class indices, or None for labels when the
    data set's classes are not the model's (an attacker's photos of other things have no label the tail knows)."""
    ds = data.load(dataset, "train")
    indices = np.sort(np.random.default_rng(seed).permutation(len(ds))[: limit or None])  # 0 or None: all
    images = data.resize(ds.images[indices], m.input_shape[1], m.input_shape[0])
    labels, unmapped = ds.labels_as(m.classes)
    return images, None if unmapped else labels[indices]


# Enough for the decoder to recognise CIFAR-sized images (docs/attacks.md), small enough for a CPU: 10 epochs on 5,000
# images take minutes where a 60,000-image train split took 49.
DEFAULT_AUX_LIMIT = 5000


def knowledge(
    attack: str,
    m: manifest.Manifest,
    split: str,
    *,
    aux_dataset: str | None,
    aux_limit: int | None,
    seed: int = 0,
    defence: str = "none",
    strength: float | None = None,
) -> dict:
    """What `attack` is given to know, as its class declares: the model and split point; `aux_limit` of `aux_dataset`'s
    train split, with their labels, where it needs them; and the defence, where it is adaptive (else it is not told)."""
    cls = ATTACKS[attack]
    given: dict = {"manifest": m, "split": split}
    if cls.needs_auxiliary:
        if aux_dataset is None:
            raise ValueError(f"{attack} trains on auxiliary images: the capture names no data set, so give one")
        given["auxiliary"], labels = auxiliary_set(aux_dataset, m, aux_limit, seed)
        if cls.needs_labels:
            if labels is None:
                raise ValueError(
                    f"{attack} trains through the model's classifier, so its auxiliary images need the model's labels, "
                    f"but {aux_dataset}'s classes are not {m.name}'s"
                )
            given["auxiliary_labels"] = labels
    if cls.adaptive and defence != "none":
        given.update(defence=defence, strength=strength)
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
    defence: str = "none",
    strength: float | None = None,
    progress: bool = False,
) -> dict:
    """Invert the activations that `capture` holds for `served_name` and score them against the originals; an
    adaptive attack is told `defence` at `strength` (other attacks are not: they model no defence).

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
    aux = {"aux_dataset": aux_dataset, "aux_limit": aux_limit}
    given = knowledge(attack, m, split, **aux, defence=defence, strength=strength)

    start = time.perf_counter()
    attacker = build(attack, **given, **(knobs or {}), progress=progress)
    built = time.perf_counter()
    reconstructions = attacker.invert(activations)
    inverted = time.perf_counter()

    streamed = data.frames(dataset, frame_ids)  # the frames' own labels, from whichever split each came
    mapped, unmapped = streamed.labels_as(m.classes)
    labels = None if unmapped else mapped
    faces = dataset in IDENTITY_DATASETS
    scores = scoring.score(
        originals,
        reconstructions,
        manifest=m,
        split=split,
        labels=labels,
        identities=streamed.labels if faces else None,
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
        "knobs": dataclasses.asdict(attacker.knobs),  # what ran: the defaults and what was given
        "defence": {"name": given["defence"], "strength": given["strength"]} if "defence" in given else None,
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
    add_aux_limit_argument(parser)
    parser.add_argument("--limit", type=int, help="invert the first N captured frames only")
    parser.add_argument("--out", type=Path, help="default: CAPTURE.ATTACK next to the capture")
    add_knob_arguments(parser, ATTACKS)
    told = parser.add_argument_group(
        f"what an adaptive attack ({', '.join(a for a, cls in ATTACKS.items() if cls.adaptive)}) is told"
    )
    told.add_argument("--defence", default="none", choices=list(defences.DEFENCES), help="the device's defence")
    told.add_argument("--strength", type=float, help="its strength (see splitleak device --help)")
    return parser


def add_knob_arguments(parser: argparse.ArgumentParser, attacks: Iterable[str]) -> None:
    """An option for every knob that `attacks` declare, defaults per attack in its help; `knobs_from_args` reads them.
    Each value stays a string here and takes the type the chosen attack declares for it."""
    group = parser.add_argument_group("attack knobs (each attack takes its own; defaults per attack)")
    seen: dict[str, dict[str, object]] = {}
    for attack in attacks:
        for name, default in ATTACKS[attack].knob_defaults().items():
            seen.setdefault(name, {})[attack] = default
    for name, defaults in seen.items():
        flag = all(isinstance(d, bool) for d in defaults.values())
        group.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            default=argparse.SUPPRESS,
            **({"action": argparse.BooleanOptionalAction} if flag else {}),
            help=", ".join(f"{attack}: {default}" for attack, default in defaults.items()),
        )


def add_aux_limit_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--aux-limit",
        type=number(int, at_least=0),
        default=DEFAULT_AUX_LIMIT,
        help=f"auxiliary images, drawn at random from the train split (default {DEFAULT_AUX_LIMIT:,}: minutes, not "
        "an hour, on a laptop's CPU; 0: the whole split)",
    )


def knobs_from_args(args: argparse.Namespace, attack: str) -> dict:
    """The knobs given on the command line, of the types `attack` declares; ValueError for one it has not."""
    types = ATTACKS[attack].knob_types()
    given = {name: getattr(args, name) for name in knob_names() if hasattr(args, name)}
    foreign = sorted(set(given) - set(types))
    if foreign:
        raise ValueError(
            f"{attack} has no knob {', '.join(option(n) for n in foreign)}; "
            f"its knobs: {', '.join(option(n) for n in types) or 'none'}"
        )
    knobs = {}
    for name, value in given.items():
        try:
            knobs[name] = value if isinstance(value, bool) else types[name](value)
        except ValueError:
            raise ValueError(f"{option(name)} is a {types[name].__name__} for {attack}, not {value!r}") from None
    return knobs


def knob_names() -> set[str]:
    return {name for cls in ATTACKS.values() for name in cls.knob_types()}


def option(knob: str) -> str:
    return "--" + knob.replace("_", "-")


def default_model_dir(name: str) -> Path:
    """Where `splitleak export` puts model `name` (the cache), else the shipped one of that name."""
    for folder in (data.cache_dir() / "models" / name, manifest.DEFAULT_MODEL_DIR.parent / name):
        if (folder / "manifest.json").exists():
            return folder
    raise FileNotFoundError(
        f"the capture's requests are for {name}, which is neither in {data.cache_dir() / 'models'} nor shipped: give "
        f"--model-dir, the folder `splitleak export` wrote for it"
    )


def main(args: argparse.Namespace) -> int:
    knobs = knobs_from_args(args, args.attack)  # a ValueError is one line and exit 2 (splitleak.cli)
    if args.defence != "none" and not ATTACKS[args.attack].adaptive:
        raise ValueError(f"{args.attack} does not model a defence, so --defence means nothing to it")
    capture = capture_format.read(args.capture)
    models = [args.model] if args.model else capture.models()
    if not models:
        raise ValueError(f"{args.capture} holds no requests")
    out = args.out or args.capture.resolve().with_name(f"{args.capture.resolve().name}.{args.attack}")
    for served_name in models:
        model_dir = args.model_dir or default_model_dir(served_name.rsplit(".", 1)[0])
        result = replay(
            capture,
            served_name,
            args.attack,
            model_dir=model_dir,
            aux_dataset=args.aux_dataset,
            aux_limit=args.aux_limit,
            limit=args.limit,
            knobs=knobs,
            defence=args.defence,
            strength=args.strength,
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
