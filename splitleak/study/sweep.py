"""`splitleak sweep`: the latency-leakage-accuracy trade-off of every split point, defence and link, from real runs.

For each configuration (model, split point, defence, strength) the sweep starts a real cloud process recording what
it receives (`splitleak cloud --record`: the curious cloud) and a real device process (`splitleak device`) that
streams the same frames through the head and the defence. That run gives the accuracy, the bytes on the wire and the
measured compute on each side: device (preprocess, head, defence, encode), cloud (restore, tail), and the transport
on loopback (serialisation, gRPC, both ways). Then each attack inverts what the cloud recorded and is scored against
the original frames. The links are not re-run: a link adds the link model's delay (splitleak.core.link) for the frame's
measured bytes each way, so

    total = device + uplink(link, bytes up) + cloud + downlink(link, bytes down) + transport (measured on loopback)

one frame at a time (the device's closed loop: no queueing). `--link loopback` is the measured run itself.

The attacker is adaptive: it knows the defence and its strength. The decoder is trained on the undefended head, then
further on activations passed through the same defence; rMLE models the defence in its distance (see its module).
A training-time defence (NoPeek, adversarial training) is a model variant (`--variant DIR`, exported with its
`training_defence` in the manifest); its rows are the variant with no run-time defence, attacked the same way.

Writes to --out: `sweep.csv` and `sweep.json` (one row per configuration and link: splitleak.study.rows), `sweep.md`
(the same for people: one line per configuration, the links side by side), and the plots (PNG and SVG:
splitleak.study.plots). What a configuration measured or an attack scored is cached under the cache folder
(`SPLITLEAK_CACHE`), keyed by the model's files and every setting that changes it, so a re-run only does what changed.
"""

from __future__ import annotations

import argparse
import ast
import functools
import hashlib
import itertools
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from splitleak import certs
from splitleak.core import compute, data, link, manifest, process
from splitleak.core.records import FrameRecord
from splitleak.study.rows import LATENCY_STAGES, AttackScores, Latency, SweepRow, write_csv, write_json

DEFAULT_DEFENCES = ("gaussian:0.5,1,2", "dropout:0.3,0.6,0.9", "quantise:8,4,2", "topk:0.25,0.5,0.75")
DEFAULT_LINKS = ("wifi", "4g", "3g")
DEFAULT_ATTACKS = ("decoder", "rmle")
# Knobs that keep the default sweep within minutes: the undefended decoder is trained in full (and cached), each
# defence adds one epoch of adaptation; rMLE runs 300 steps on 16 frames (bench/attack_table.py runs 5,000).
ATTACK_KNOBS = {"decoder": {"epochs": 10, "adapt_epochs": 1}, "rmle": {"steps": 300}}
ATTACK_FRAMES = {"rmle": 16}  # at most this many frames for the slow attacks


@functools.cache
def load_manifest(model_dir: Path) -> manifest.Manifest:
    """Each model folder is read (and its files' sha256 checked) once per sweep, not once per configuration."""
    return manifest.load(model_dir)


@dataclass(frozen=True)
class Config:
    """One real device -> cloud run: a model folder, a split point, and the run-time defence at a strength."""

    model_dir: Path
    split: str
    defence: str = "none"
    strength: float = 0.0

    @property
    def label(self) -> str:
        return f"{load_manifest(self.model_dir).name}.{self.split} {self.defence} {self.strength:g}"


@dataclass(frozen=True)
class Settings:
    """What every configuration of a sweep shares."""

    dataset: str
    frames: int  # streamed per configuration: accuracy, bytes and latency come from all of them
    attack_frames: int  # the first of those frames that each attack inverts and is scored on
    aux_images: int  # auxiliary train-split images for the attacks that query the head
    seed: int = 0
    knobs: dict = field(default_factory=dict)  # attack -> knob overrides, on top of ATTACK_KNOBS
    tls: bool = False  # device and cloud speak mutual TLS (certificates made once, in the cache)

    def knobs_of(self, attack: str) -> dict:
        return {**ATTACK_KNOBS.get(attack, {}), **self.knobs.get(attack, {})}

    def frames_of(self, attack: str) -> int:
        return min(self.attack_frames, ATTACK_FRAMES.get(attack, self.attack_frames))


def parse_defences(specs: list[str]) -> list[tuple[str, float]]:
    """["gaussian:0.5,1", "fp16"] -> [("gaussian", 0.5), ("gaussian", 1.0), ("fp16", default)]."""
    from splitleak.core import defences

    out = []
    for spec in specs:
        name, _, strengths = spec.partition(":")
        if name not in defences.DEFENCES:
            raise ValueError(f"unknown defence {name!r} in {spec!r}; defences: {', '.join(defences.DEFENCES)}")
        cls = defences.DEFENCES[name]
        if not strengths:
            if cls.strengths.default is None:
                raise ValueError(f"{spec!r}: {name} needs strengths, NAME:S1,S2,... ({cls.strengths.describe()})")
            out.append((name, cls.strengths.default))
            continue
        try:
            chosen = [float(s) for s in strengths.split(",")]
        except ValueError:
            raise ValueError(f"{spec!r}: strengths must be numbers separated by commas") from None
        # Checked here against what the defence declares, not after the configurations before it have run.
        wrong = [s for s in chosen if not cls.strengths.allows(s)]
        if wrong:
            raise ValueError(f"{spec!r}: {name} takes {cls.strengths.describe()}, not {', '.join(map(str, wrong))}")
        out += [(name, s) for s in chosen]
    return out


def parse_knobs(specs: list[str]) -> dict[str, dict]:
    """["decoder.epochs=5", "rmle.steps=100"] -> {"decoder": {"epochs": 5}, "rmle": {"steps": 100}}."""
    from splitleak.attacker.attacks import ATTACKS

    knobs: dict[str, dict] = {}
    for spec in specs:
        name, _, value = spec.partition("=")
        attack, _, knob = name.partition(".")
        if not value or not knob:
            raise ValueError(f"--knob {spec!r}: expected ATTACK.NAME=VALUE, e.g. decoder.epochs=5")
        if attack not in ATTACKS:
            raise ValueError(f"--knob {spec!r}: no attack {attack!r}; attacks: {', '.join(ATTACKS)}")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value  # a string
        knobs.setdefault(attack, {})[knob] = parsed
    for attack, given in knobs.items():
        ATTACKS[attack].check_knobs(given)  # names, types and ranges, as the attack declares them, before any run
    return knobs


def configs(model_dir: Path, variants: list[Path], splits: list[str] | None, runtime: list[tuple[str, float]]):
    """Every configuration: each split of the model undefended and with each run-time defence, and each variant."""
    m = load_manifest(model_dir)
    chosen = splits or list(m.splits)
    for split in chosen:
        m.split(split)  # an unknown split fails here, before anything runs
        yield Config(model_dir, split)
        for name, strength in runtime:
            yield Config(model_dir, split, name, strength)
    for variant in variants:
        v = load_manifest(variant)
        for split in chosen:
            if split in v.splits:
                yield Config(variant, split)


# Caching: a key is a hash of everything that changes a result.


def _key(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _model_key(model_dir: Path, split: str) -> str:
    m = load_manifest(model_dir)  # load checks every file's sha256 against the manifest
    return f"{m.name}-{_key((model_dir / 'manifest.json').read_text(), split)}"


def cache_path(config: Config, settings: Settings, what: str) -> Path:
    folder = data.cache_dir() / "sweep" / _model_key(config.model_dir, config.split)
    key = _key(config.split, config.defence, config.strength, settings.dataset, settings.frames, settings.seed)
    key += "-tls" if settings.tls else ""
    path = folder / f"{config.defence}-{config.strength:g}-{key}" / f"{what}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


# One configuration: the real run, then the attacks on what the cloud recorded.


def run_device(config: Config, settings: Settings, workdir: Path) -> tuple[list[FrameRecord], Path]:
    """Stream the frames from a device process to a recording cloud process; (the device's records, capture)."""
    capture_dir, out = workdir / "capture", workdir / "device.json"
    tls = ["--tls", str(certs.ensure(data.cache_dir() / "tls"))] if settings.tls else []
    with open(workdir / "cloud.log", "w") as log:  # the cloud's own messages, kept off the progress bar
        cloud, port = process.start_cloud(
            [config.model_dir], ["--record", str(capture_dir), "--dataset", settings.dataset, *tls], stderr=log
        )
    try:
        cmd = [
            sys.executable, "-m", "splitleak.cli", "device",
            "--cloud", f"127.0.0.1:{port}",
            "--model-dir", str(config.model_dir),
            "--split", config.split,
            "--defence", config.defence,
            "--strength", str(config.strength),
            "--dataset", settings.dataset,
            "--limit", str(settings.frames),
            "--seed", str(settings.seed),
            "--json", str(out),
            *tls,
        ]  # fmt: skip
        done = subprocess.run(process.dies_with_parent(cmd), capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"the device failed on {config.label} (exit {done.returncode}):\n{done.stderr}")
    finally:
        process.stop(cloud)
    return [FrameRecord.from_json(frame) for frame in json.loads(out.read_text())["frames"]], capture_dir


def measurement(records: list[FrameRecord]) -> dict:
    """Per-frame arrays of what a run measured: the stages, the bytes, whether the cloud's prediction was right."""
    refused = [r.error for r in records if r.error]
    if refused:
        raise RuntimeError(f"the cloud refused frames: {refused[0]}")
    device = [r.preprocess_ms + r.head_ms + r.defence_ms + r.encode_ms for r in records]
    return {
        "frame": [r.frame for r in records],
        "correct": [bool(r.prediction == r.label) for r in records],
        "prediction": [r.prediction for r in records],
        "bytes_up": [r.bytes_up for r in records],
        "bytes_down": [r.bytes_down for r in records],
        "device_ms": device,
        "head_ms": [r.head_ms for r in records],
        "cloud_ms": [r.cloud_ms for r in records],
        # What loopback adds beyond compute: serialisation, gRPC and the kernel's loopback, both ways.
        "transport_ms": [r.total_ms - d - r.cloud_ms for r, d in zip(records, device, strict=True)],
        "loopback_uplink_ms": [r.uplink_ms for r in records],
        "loopback_downlink_ms": [r.downlink_ms for r in records],
    }


def intercepted(config: Config, capture_dir: Path, frames: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The first `frames` activations the cloud recorded, restored, with their frame ids and the original frames."""
    from splitleak.core import capture

    m = load_manifest(config.model_dir)
    split = m.split(config.split)
    recorded = capture.read(capture_dir)
    frame_ids, activations = recorded.activations(m.served_name(split.name), shape=split.activation_shape)
    frame_ids, activations = frame_ids[:frames], activations[:frames]
    return frame_ids, activations, recorded.originals(frame_ids, m)


def attack_scores(
    config: Config, attack: str, frames: tuple[np.ndarray, np.ndarray, np.ndarray], settings: Settings
) -> dict:
    """Invert the first of the `intercepted` frames with `attack` (ATTACK_FRAMES caps the slow ones), score them."""
    from splitleak.attacker import scoring
    from splitleak.attacker.attacks import build
    from splitleak.attacker.replay import knowledge

    m = load_manifest(config.model_dir)
    frame_ids, activations, originals = (a[: settings.frames_of(attack)] for a in frames)
    knobs = settings.knobs_of(attack)
    aux = {"aux_dataset": settings.dataset, "aux_limit": settings.aux_images, "seed": settings.seed}
    # An adaptive attack is told the defence (its class says whether it is); the others attack as they would anyway.
    given = knowledge(attack, m, config.split, **aux, defence=config.defence, strength=config.strength)
    start = time.perf_counter()
    attacker = build(attack, **given, **knobs)
    built = time.perf_counter()
    reconstructions = attacker.invert(activations)
    inverted = time.perf_counter()
    scores = scoring.score(originals, reconstructions, manifest=m, split=config.split)
    summary = scores["summary"]
    return {
        "knobs": knobs | {k: given[k] for k in ("defence", "strength") if k in given},
        "frames": len(frame_ids),
        "psnr": summary["psnr_mean"],
        "ssim": summary["ssim_mean"],
        "recognisable": summary["recognisable"],
        "label_leakage": summary["label_leakage"],
        "seconds_build": built - start,
        "ms_per_frame": (inverted - built) * 1e3 / max(len(frame_ids), 1),
    }


def result_paths(config: Config, settings: Settings, attacks: list[str]) -> tuple[Path, dict[str, Path]]:
    """Where what `config` measured is cached, and where each attack's scores are."""
    measured_path = cache_path(config, settings, "measured")
    attack_paths = {
        attack: cache_path(config, settings, f"attack-{attack}-{_key(settings.knobs_of(attack), settings)}")
        for attack in attacks
    }
    return measured_path, attack_paths


def read_results(measured_path: Path, attack_paths: dict[str, Path]) -> dict:
    return {
        "measured": json.loads(measured_path.read_text()),
        "attacks": {a: json.loads(p.read_text()) for a, p in attack_paths.items()},
    }


def evaluate(config: Config, settings: Settings, attacks: list[str]) -> dict:
    """What `config` measured and what each attack scored, from the cache where it is there."""
    measured_path, attack_paths = result_paths(config, settings, attacks)
    missing = [a for a, p in attack_paths.items() if not p.exists()]
    stale = measured_path.exists() and "head_ms" not in json.loads(measured_path.read_text())  # before profiles
    if missing or stale or not measured_path.exists():
        with tempfile.TemporaryDirectory(prefix="splitleak-sweep-") as tmp:
            records, capture_dir = run_device(config, settings, Path(tmp))
            measured_path.write_text(json.dumps(measurement(records)))
            frames = intercepted(config, capture_dir, settings.attack_frames) if missing else None
            for attack in missing:
                attack_paths[attack].write_text(json.dumps(attack_scores(config, attack, frames, settings)))
    return read_results(measured_path, attack_paths)


# The table: one row per configuration and link.


def link_delays_ms(profile: link.LinkProfile, nbytes: list[int], seed: int) -> np.ndarray:
    """The link model's delay for each message sent on its own (closed loop: no message waits for another)."""
    model = link.Link(profile, seed)
    sent = [i * 3600.0 for i in range(len(nbytes))]  # an hour apart: never queued behind each other
    return np.array([(model.arrival(n, t) - t) * 1e3 for n, t in zip(nbytes, sent, strict=True)])


def latency(values: np.ndarray) -> Latency:
    return Latency(median=float(np.median(values)), p95=float(np.percentile(values, 95)))


def rows(
    config: Config, result: dict, links: list[str], reference: dict, seed: int = 0, devices: tuple[str, ...] = ("host",)
) -> list[SweepRow]:
    """`reference`: the measurement of the undefended base model, whose accuracy the drop is counted from.

    A slower device (splitleak.core.compute) changes the latency alone: its head takes what the time model predicts
    (the head's calibrated CPU time on this host times the profile's slowdown), in place of each frame's measured head
    time, so that the same split costs the same on every configuration; the device's other stages are as measured."""
    measured = result["measured"]
    m = load_manifest(config.model_dir)
    variant = m.training_defence
    configuration = dict(
        model=m.name,
        split=config.split,
        defence=variant["name"] if variant else config.defence,
        strength=variant["strength"] if variant else config.strength,
        training_time=bool(variant),
        frames=len(measured["frame"]),
        accuracy=float(np.mean(measured["correct"])),
        # in points, rounded so that a drop of exactly 1 frame in 100 is 1.0, not 1.0000000000000009
        accuracy_drop=round(100 * (float(np.mean(reference["correct"])) - float(np.mean(measured["correct"]))), 6),
        bytes_up=float(np.median(measured["bytes_up"])),
        attacks={
            attack: AttackScores(
                psnr=s["psnr"], ssim=s["ssim"], recognisable=s["recognisable"], label_leakage=s["label_leakage"]
            )
            for attack, s in result["attacks"].items()
        },
    )
    out = []
    calibration = compute.calibrate(config.model_dir) if set(devices) != {"host"} else None
    for device, name in itertools.product(devices, links):
        profile = link.profile(name)
        device_ms = np.array(measured["device_ms"])
        if device != "host":
            slowdown = compute.PROFILES[device].slowdown(calibration.host_gmacs)
            device_ms += calibration.predict_ms(config.split, slowdown) - np.array(measured["head_ms"])
        stages = {
            "device": device_ms,
            "cloud": np.array(measured["cloud_ms"]),
            "transport": np.array(measured["transport_ms"]),
            "uplink": link_delays_ms(profile, measured["bytes_up"], seed),
            "downlink": link_delays_ms(profile, measured["bytes_down"], seed + 1),
        }
        total = sum(stages.values())  # summed in this order, as the sweep always has: another changes the last bits
        latency_ms = {stage: latency(stages[stage]) for stage in LATENCY_STAGES} | {"total": latency(total)}
        out.append(SweepRow(**configuration, link=name, latency_ms=latency_ms, device=device))
    return out


def markdown(table: list[SweepRow]) -> str:
    """The table for people: one line per configuration, the links side by side (median total latency)."""
    links = list(dict.fromkeys(r.link for r in table))
    attacks = list(table[0].attacks)
    devices = len({r.device for r in table}) > 1
    head = ["device"] * devices + ["split", "defence", "strength", "accuracy", "drop (points)", "bytes up"]
    head += [f"{a} SSIM" for a in attacks] + [f"{a} label leakage" for a in attacks] + [f"{n} ms" for n in links]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    by_config: dict[tuple, dict[str, SweepRow]] = {}
    for r in table:
        by_config.setdefault((r.device, r.model, r.split, r.defence, r.strength), {})[r.link] = r
    for (device, _, split, defence, strength), per_link in by_config.items():
        r = per_link[links[0]]
        trained = " (trained)" if r.training_time else ""
        cells = [device] * devices + [
            split,
            defence + trained,
            f"{strength:g}",
            f"{100 * r.accuracy:.1f}%",
            f"{r.accuracy_drop:.1f}",
        ]
        cells += [f"{r.bytes_up:,.0f}"] + [f"{r.attacks[a].ssim:.3f}" for a in attacks]
        cells += [f"{100 * r.attacks[a].label_leakage:.0f}%" for a in attacks]
        cells += [f"{per_link[n].total_ms():.1f}" for n in links]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(table: list[SweepRow], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    write_json(table, out / "sweep.json")
    (out / "sweep.md").write_text(markdown(table))
    write_csv(table, out / "sweep.csv")


def sweep(
    model_dir: Path,
    *,
    variants: list[Path],
    splits: list[str] | None,
    runtime: list[tuple[str, float]],
    links: list[str],
    attacks: list[str],
    settings: Settings,
    devices: tuple[str, ...] = ("host",),
    progress: bool = True,
) -> list[SweepRow]:
    from tqdm import tqdm

    todo = list(configs(model_dir, variants, splits, runtime))
    results = {}
    with tqdm(todo, desc="sweep", unit="config", disable=not progress) as bar:
        for config in bar:
            bar.set_postfix_str(config.label)
            results[config] = evaluate(config, settings, attacks)
    return table_of(model_dir, results, links, settings.seed, devices)


def table_of(
    model_dir: Path, results: dict[Config, dict], links: list[str], seed: int, devices: tuple[str, ...] = ("host",)
) -> list[SweepRow]:
    """The rows of every configuration's `results`, in their order, on every link and device; accuracy drops from
    the first undefended one."""
    reference = results[Config(model_dir, next(iter(results)).split)]["measured"]
    return [row for config, result in results.items() for row in rows(config, result, links, reference, seed, devices)]


def get_args_parser() -> argparse.ArgumentParser:
    from splitleak.attacker.attacks import ATTACKS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=manifest.DEFAULT_MODEL_DIR, help="an exported model")
    parser.add_argument(
        "--variant",
        type=Path,
        action="append",
        default=[],
        help="a model variant with a training-time defence (NoPeek, adversarial), exported with its manifest's "
        "training_defence; repeat for several",
    )
    parser.add_argument("--split", action="append", help="split points (repeat; default: all)")
    parser.add_argument(
        "--defence",
        action="append",
        metavar="NAME:S1,S2,...",
        help=f"run-time defences and strengths (repeat; default: {' '.join(DEFAULT_DEFENCES)}; 'none' for none)",
    )
    parser.add_argument(
        "--link",
        action="append",
        choices=list(link.PROFILES),
        help=f"link profiles (repeat; default: {' '.join(DEFAULT_LINKS)})",
    )
    parser.add_argument(
        "--device",
        action="append",
        choices=list(compute.PROFILES),
        help="device profiles (repeat; default: host): a slower device changes the latency alone, leakage is reused",
    )
    parser.add_argument(
        "--attack", action="append", choices=list(ATTACKS), help=f"attacks (default: {' '.join(DEFAULT_ATTACKS)})"
    )
    parser.add_argument("--dataset", default=None, help="default: cifar10 from the data root")
    parser.add_argument("--frames", type=int, default=500, help="frames streamed per configuration")
    parser.add_argument("--attack-frames", type=int, default=32, help="of those, how many each attack inverts")
    parser.add_argument("--aux-images", type=int, default=4000, help="auxiliary images for the decoder")
    parser.add_argument(
        "--knob",
        action="append",
        default=[],
        metavar="ATTACK.NAME=VALUE",
        help="an attack's knob (see splitleak attack --help), e.g. decoder.epochs=5; repeat for several",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tls",
        action="store_true",
        help="device and cloud speak mutual TLS: what it costs per frame, against a sweep without",
    )
    parser.add_argument("--out", type=Path, default=Path("sweep"), help="where the table and the plots go")
    parser.add_argument("--no-plots", action="store_true")
    return parser


def main(args: argparse.Namespace, run: Callable[..., list[SweepRow]] | None = None) -> int:
    """`run`: what computes the table of the configurations (`run(todo, links=, attacks=, settings=)`) instead of the
    serial `sweep`, as splitleak.study.cluster's runs them on Dask."""
    dataset = args.dataset or data.default_dataset()
    if dataset == "embedded":
        print(
            "sweep: the embedded photos have no labels; give --dataset (cifar10 needs the data root)", file=sys.stderr
        )
        return 2
    specs = [] if args.defence == ["none"] else (args.defence or list(DEFAULT_DEFENCES))
    try:
        runtime = parse_defences(specs)
    except ValueError as e:
        print(f"sweep: {e}", file=sys.stderr)
        return 2
    try:
        knobs = parse_knobs(args.knob)
    except ValueError as e:
        print(f"sweep: {e}", file=sys.stderr)
        return 2
    frames = min(args.attack_frames, args.frames)
    settings = Settings(dataset, args.frames, frames, args.aux_images, args.seed, knobs, args.tls)
    start = time.perf_counter()
    chosen = dict(
        links=args.link or list(DEFAULT_LINKS),
        attacks=args.attack or list(DEFAULT_ATTACKS),
        settings=settings,
        devices=tuple(args.device or ["host"]),
    )
    try:
        if run is None:
            table = sweep(args.model_dir, variants=args.variant, splits=args.split, runtime=runtime, **chosen)
        else:
            table = run(list(configs(args.model_dir, args.variant, args.split, runtime)), **chosen)
    except (KeyError, ValueError, RuntimeError) as e:  # a split, an attack or a run that cannot be done, and why
        print(f"sweep: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        return 1
    write_table(table, args.out)
    if not args.no_plots:
        from splitleak.study import plots

        plots.write_all(table, args.out)
    print(f"sweep: {len(table)} rows in {args.out / 'sweep.csv'} ({time.perf_counter() - start:.0f} s)")
    return 0
