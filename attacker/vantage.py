"""`splitleak vantage`: membership inference on a deployed model from where each party on the split channel stands.

The shipped models were trained on their data set's whole train split, so of the frames a device streams with
`--frames mix` the train frames are members and the test frames non-members, and a frame id says which is which
(splitleak.core.data). The proxy's capture keeps the cloud's answers (`Capture.logits`). Three vantage points
(VANTAGES) score the captured frames:

- `audit`: the model owner. True labels, and the model's own logits: it runs head and tail itself on the frames.
- `app`: the app user. Holds the head, sends frames it knows (true labels) and reads the cloud's answers: the
  captured logits.
- `tap`: the proxy, or a third party hosting the tail. Sees every answer but no label, so the label is the model's
  own prediction (the argmax of the answer), and one score needs no label at all.

The scores (ATTACKS), higher meaning "member":

- `loss`: log p(label | x), the loss-threshold baseline. With the predicted label this is the log of the answer's
  largest probability.
- `entropy`: minus the entropy of the answer: needs no label.
- `lira-offline`: LiRA's one-sided test of the scaled logit against reference models that did not train on the frame
  (splitleak.attacker.membership.lira).
- `rmia`: offline RMIA against population frames that no reference model trained on
  (splitleak.attacker.membership.rmia).

The last two take reference models: the shadow models of `splitleak shadows`, which hold each model's logits on its
pool (train-split images, each in half the models' training sets) and its population (test-split images, in none).
Only frames among those can be calibrated, so with `--shadows` only those frames are scored, by every attack alike,
and the rest of the capture is left out. This was chosen over saving the shadows' weights so that references could
score any frame: runs in progress and finished ones keep logits only, and a device that streams a large enough mix
hits the pool and the population anyway. The channel carries each frame once, as it is, so every score takes one
query (no flipped copy, unlike the shadows' leave-one-out test).

Two choices keep the evaluation from leaking membership by itself:
- A pool frame has half the reference models on its OUT side and a population frame all of them. Every frame's OUT
  side is therefore cut at random to the same number of models (the smallest any scored frame has), so that the number
  behind a fit, and with it the fit's spread, says nothing.
- RMIA's population is the captured population frames themselves, with the target's answers on them, since the tap
  sees the target only through the answers. A population frame (a non-member) is thus compared with itself too,
  which raises its score by at most one step (1/P): the attack can only look a little weaker for it, never stronger.

`--answers top1` emulates a cloud that answers only the label (splitleak's cloud cannot be told to; the answers are
cut to a one-hot vector after the fact): every frame's answer then has the same confidence, so the label-free score
and the tap's loss are the same for every frame (chance), while the app user and the owner, who know the true label,
keep one bit: whether the model got the frame right.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnxruntime

from splitleak.attacker import membership
from splitleak.core import capture as capture_format
from splitleak.core import data, manifest
from splitleak.device.head import Head
from splitleak.model import shadows as shadow_models

ATTACKS = ("loss", "entropy", "lira-offline", "rmia")
CALIBRATED = ("lira-offline", "rmia")  # need reference models
ANSWERS = ("logits", "top1")


@dataclass(frozen=True)
class Vantage:
    name: str
    true_labels: bool  # knows each frame's label; otherwise takes the model's prediction as the label
    own_model: bool  # runs the whole model itself; otherwise reads the cloud's answers from the capture
    sees: str


VANTAGES = {
    v.name: v
    for v in (
        Vantage("audit", True, True, "the model owner: true labels, the model's own logits"),
        Vantage("app", True, False, "the app user: true labels of the frames it sends, the cloud's answers"),
        Vantage("tap", False, False, "the proxy or the tail's host: the cloud's answers, no labels"),
    )
}


@dataclass(frozen=True)
class References:
    """Reference models' logits on the frames they hold, by frame id."""

    frame_ids: np.ndarray  # (N,)
    logits: np.ndarray  # (R, N, C): each frame as it is (the shadows' first query)
    trained: np.ndarray  # (R, N) bool: reference model r trained on frame n

    @classmethod
    def load(cls, folder: Path) -> References:
        shadows = shadow_models.Shadows.load(folder)
        pool, population = shadow_models.frame_ids(folder)
        return cls(
            np.concatenate([pool, population]),
            np.concatenate([shadows.logits[:, 0], shadows.population_logits[:, 0]], 1),
            np.concatenate([shadows.masks, np.zeros((len(shadows.masks), len(population)), bool)], 1),
        )

    def on(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits (R, n, C), trained (R, n)) on frames `ids`, each of which must be one of `frame_ids`."""
        where = {int(f): i for i, f in enumerate(self.frame_ids)}
        index = np.array([where[int(f)] for f in ids], np.int64)
        return self.logits[:, index], self.trained[:, index]


@dataclass(frozen=True)
class Frames:
    """The frames a vantage point scores, and the truth it is judged against."""

    ids: np.ndarray  # (N,) frame ids
    logits: np.ndarray  # (N, C) the target's answers, as this vantage point reads them
    labels: np.ndarray  # (N,) the labels it scores with: true, or the prediction
    members: np.ndarray  # (N,) bool: a train-split frame, in the shipped model's training set


def top1(logits: np.ndarray) -> np.ndarray:
    """The answer of a cloud that gives only the label: a one-hot vector at the argmax."""
    return np.eye(logits.shape[-1], dtype=np.float32)[logits.argmax(-1)]


def model_logits(model_dir: Path, images: np.ndarray, batch: int = 100) -> np.ndarray:
    """(N, C): what the model owner computes for uint8 frames (N, H, W, C): head and tail at the default split, run
    with ONNX Runtime as the device and the cloud run them."""
    head = Head(model_dir)
    tail = onnxruntime.InferenceSession(str(head.split.tail), providers=["CPUExecutionProvider"])
    x = head.manifest.preprocess(images)
    return np.concatenate(
        [tail.run(["logits"], {"activation": head.run(x[i : i + batch])})[0] for i in range(0, len(x), batch)]
    )


def captured_logits(capture: capture_format.Capture, m: manifest.Manifest) -> tuple[np.ndarray, np.ndarray]:
    """(frame ids, logits) of every answered frame of model `m` in the capture, at whichever split it was sent (the
    logits are the whole model's at any split); a frame answered more than once (a device with --loop) counts once."""
    names = [name for name in capture.models() if name.rpartition(".")[0] == m.name]
    if not names:
        raise KeyError(
            f"{capture.path} holds no requests to {m.name}; it holds {', '.join(capture.models()) or 'none'}"
        )
    parts = [capture.logits(name) for name in names]
    ids, logits = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    ids, first = np.unique(ids, return_index=True)
    return ids, logits[first]


def frames(
    capture: capture_format.Capture,
    model_dir: Path,
    vantage: Vantage,
    *,
    answers: str = "logits",
    only: np.ndarray | None = None,
) -> Frames:
    """The captured frames (those in `only`, when given) as `vantage` reads them."""
    m = manifest.load(model_dir)
    dataset = capture.meta.get("dataset")
    if dataset is None:
        raise ValueError(
            f"{capture.path} does not say which data set its frames come from: capture with "
            f"splitleak attacker proxy --dataset {m.dataset}, so that frame ids name images and membership"
        )
    if dataset != m.dataset:
        raise ValueError(
            f"{capture.path} holds frames of {dataset!r} but {m.name} was trained on {m.dataset!r}: membership needs "
            f"a capture of the model's own data set (splitleak attacker proxy --dataset {m.dataset})"
        )
    ids, logits = captured_logits(capture, m)
    if only is not None:
        keep = np.isin(ids, only)
        ids, logits = ids[keep], logits[keep]
    streamed = data.frames(dataset, ids)
    true_labels, _ = streamed.labels_as(m.classes)
    if vantage.own_model:
        logits = model_logits(model_dir, data.resize(streamed.images, m.input_shape[1], m.input_shape[0]))
    if answers == "top1":
        logits = top1(logits)
    elif answers != "logits":
        raise ValueError(f"answers are {' or '.join(ANSWERS)}, not {answers!r}")
    labels = true_labels if vantage.true_labels else logits.argmax(1)
    return Frames(ids, logits, labels, data.is_train_frame(dataset, ids))


def scores(
    attack: str,
    f: Frames,
    references: References | None = None,
    *,
    seed: int = 0,
) -> np.ndarray:
    """(N,) membership scores of `attack` on frames `f`; the calibrated attacks take `references` holding them all."""
    if attack == "loss":
        return membership.log_softmax_at(f.logits, f.labels)
    if attack == "entropy":
        logp = f.logits - f.logits.max(-1, keepdims=True)
        logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
        return (np.exp(logp) * logp).sum(-1)
    if attack not in CALIBRATED:
        raise ValueError(f"no membership attack {attack!r}; attacks: {', '.join(ATTACKS)}")
    if references is None:
        raise ValueError(f"{attack} takes reference models: give --shadows, a folder `splitleak shadows` wrote")
    ref_logits, trained = references.on(f.ids)
    use = even_out(trained, np.random.default_rng(seed))
    if attack == "lira-offline":
        target_phi = membership.scaled_logit(f.logits[None], f.labels)  # (1, N): one query
        ref_phi = membership.scaled_logit(ref_logits, f.labels)[:, None]  # (R, 1, N)
        return membership.lira(target_phi, ref_phi, trained, "offline", use)
    population = ~trained.any(0)
    if not population.any():
        raise ValueError("RMIA needs population frames (test-split frames no reference model trained on) among those")
    target_p = np.exp(membership.log_softmax_at(f.logits, f.labels))  # (N,)
    ref_p = np.exp(membership.log_softmax_at(ref_logits, f.labels))  # (R, N)
    # Offline RMIA averages the references that did not train on a frame; one left out by `use` counts as trained.
    return membership.rmia(target_p, ref_p, trained | ~use, target_p[population], ref_p[:, population])


def even_out(trained: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(R, N) bool: the reference models each frame's OUT side is fitted on, the same number for every frame (the
    smallest any frame has), picked at random. See the module's docstring for why."""
    out = ~trained
    keep = int(out.sum(0).min())
    if keep < 1:
        raise ValueError("a frame has no reference model that did not train on it: train more shadow models")
    use = np.zeros_like(trained)
    for n in range(trained.shape[1]):
        use[rng.choice(np.flatnonzero(out[:, n]), keep, replace=False), n] = True
    return use


@dataclass(frozen=True)
class Report:
    vantage: str
    answers: str
    frames: Frames
    scores: dict[str, np.ndarray]  # by attack, (N,)
    results: list[membership.Result]  # one per attack, then the shuffled control


def run(
    capture_dir: Path,
    target: Path,
    vantage: str,
    *,
    shadows: Path | None = None,
    answers: str = "logits",
    attacks: list[str] | None = None,
    resamples: int = 200,
    seed: int = 0,
) -> Report:
    """Score every captured frame (every one the references hold, with `shadows`) from `vantage`, and judge the
    scores: AUC and TPR at low FPR with bootstrap intervals, and a shuffled-membership control."""
    if vantage not in VANTAGES:
        raise ValueError(f"no vantage point {vantage!r}; vantage points: {', '.join(VANTAGES)}")
    references = None if shadows is None else References.load(shadows)
    usable = ATTACKS if references is not None and answers == "logits" else ("loss", "entropy")
    attacks = list(attacks or usable)
    if refused := [a for a in attacks if a not in usable]:
        why = "a top-1 answer has no confidence to calibrate" if answers == "top1" else "they take --shadows"
        raise ValueError(f"{', '.join(refused)} cannot run here: {why}")
    capture = capture_format.read(capture_dir)
    # With references, the frames they can calibrate: those at least one of them did not train on (all of them
    # once a shadow run is finished; some of the pool are in every finished model while it runs).
    only = None if references is None else references.frame_ids[(~references.trained).any(0)]
    f = frames(capture, target, VANTAGES[vantage], answers=answers, only=only)
    if f.members.all() or not f.members.any():
        raise ValueError(
            f"{capture_dir} holds {int(f.members.sum())} training and {int((~f.members).sum())} test frames "
            "that can be scored here: stream both (splitleak device --frames mix)"
        )
    by_attack = {a: scores(a, f, references, seed=seed) for a in attacks}
    results = [membership.judge(a, s, f.members, resamples=resamples, seed=seed) for a, s in by_attack.items()]
    shuffled = np.random.default_rng(seed).permutation(f.members)
    control = membership.judge("shuffled control", by_attack[attacks[-1]], shuffled, resamples=resamples, seed=seed)
    return Report(vantage, answers, f, by_attack, [*results, control])


def markdown(report: Report) -> str:
    members = int(report.frames.members.sum())
    lines = [
        f"Vantage point `{report.vantage}` ({VANTAGES[report.vantage].sees}), answers: {report.answers}; "
        f"{members} training frames (members) and {len(report.frames.ids) - members} test frames.",
        "",
        "| attack | AUC | TPR at 0.1% FPR | TPR at 1% FPR | TPR at 10% FPR |",
        "|---|---|---|---|---|",
    ]
    for r in report.results:
        cells = [f"{r.auc[0]:.3f} ({r.auc[1]:.3f}-{r.auc[2]:.3f})"]
        cells += [f"{v:.2%} ({lo:.2%}-{hi:.2%})" for v, lo, hi in r.tpr.values()]
        lines.append(f"| {r.attack} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capture", type=Path, required=True, help="a proxy's capture of a device's --frames mix")
    parser.add_argument(
        "--target",
        type=Path,
        default=manifest.DEFAULT_MODEL_DIR,
        help="the exported model the cloud serves, trained on its data set's whole train split (default: the shipped "
        "ResNet-20)",
    )
    parser.add_argument("--vantage", choices=list(VANTAGES), default="tap", help="who is looking")
    parser.add_argument("--shadows", type=Path, help="reference models (a folder `splitleak shadows` wrote)")
    parser.add_argument(
        "--answers", choices=ANSWERS, default="logits", help="top1: as if the cloud answered only the label"
    )
    parser.add_argument("--attack", action="append", choices=ATTACKS, help="(repeat; default: all that can run)")
    parser.add_argument("--out", type=Path, help="where the results go (default: CAPTURE/membership-VANTAGE-ANSWERS)")
    parser.add_argument("--resamples", type=int, default=200, help="bootstrap resamples for the intervals")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(args: argparse.Namespace) -> int:
    report = run(
        args.capture,
        args.target,
        args.vantage,
        shadows=args.shadows,
        answers=args.answers,
        attacks=args.attack,
        resamples=args.resamples,
        seed=args.seed,
    )
    out = args.out or args.capture / f"membership-{args.vantage}-{args.answers}"
    out.mkdir(parents=True, exist_ok=True)
    table = markdown(report)
    (out / "membership.md").write_text(table)
    (out / "membership.json").write_text(json.dumps([asdict(r) for r in report.results], indent=1) + "\n")
    np.savez(out / "scores.npz", frame_ids=report.frames.ids, members=report.frames.members, **report.scores)
    membership.plot({a: membership.Roc.of(s, report.frames.members) for a, s in report.scores.items()}, out / "roc.png")
    print(table, end="")
    print(f"wrote {out / 'membership.md'}, membership.json, scores.npz (per frame) and roc.png")
    return 0
