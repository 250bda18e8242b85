"""Membership inference: was this example in the model's training set? Scores, their ROC, and `splitleak membership`.

The attacks, each a score per (model, example) where higher means "member":

- `loss`: the loss-threshold baseline (Yeom et al. 2018), the log-probability the model gives the label.
- `lira-online`, `lira-offline`, `lira-fixed`, `lira-offline-fixed`: LiRA (Carlini et al., S&P 2022, "Membership
  Inference Attacks From First Principles", Algorithm 1). The model's confidence in the label, scaled to a logit
  phi = log p_y - log(1 - p_y), is compared with its distribution over reference models trained with the example (IN)
  and without it (OUT), each a Gaussian fitted per example and per query (the image and its flip):
  online is the likelihood ratio IN against OUT; offline, the one-sided test against OUT alone; fixed and
  offline-fixed, the same with one variance for every example on each side (the paper's choice when reference
  models are few: a variance fitted to a handful of models is noisier than the mean).
- `rmia`: RMIA (Zarifzadeh et al., ICML 2024, "Low-Cost High-Power Membership Inference Attacks"): the likelihood
  ratio p(y|x, target) / p(y|x) with p(y|x) the reference models' average (offline: OUT models only, corrected by
  `a`), compared pairwise with the same ratio on population examples that no model trained on; the score is the share
  of population examples it beats by a factor gamma.

A score is judged by the true-positive rate at a low false-positive rate (Carlini et al.'s point: an attack that is
right on average can still be useless on the few examples that matter), plus the AUC, each with a bootstrap
confidence interval. Shadow models come from splitleak.model.shadows; each of them is in turn the target and the others
its references (leave one out), so every example is judged against every model.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.stats import norm

ATTACKS = ("loss", "lira-online", "lira-offline", "lira-fixed", "lira-offline-fixed", "rmia")
FPRS = (0.001, 0.01, 0.1)
MIN_STD = 1e-3  # a per-example standard deviation below this is a fit to too few models: floored


def scaled_logit(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """phi = log p_y - log(1 - p_y) from raw logits (..., N, C) and labels (N,), computed without forming p_y."""
    picked = np.take_along_axis(logits, np.broadcast_to(labels[:, None], (*logits.shape[:-1], 1)), -1)[..., 0]
    others = np.where(np.arange(logits.shape[-1]) == labels[:, None], -np.inf, logits)
    top = others.max(-1, keepdims=True)
    return picked - (top[..., 0] + np.log(np.exp(others - top).sum(-1)))


def log_softmax_at(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """log p_y from raw logits (..., N, C) and labels (N,)."""
    top = logits.max(-1, keepdims=True)
    lse = top[..., 0] + np.log(np.exp(logits - top).sum(-1))
    picked = np.take_along_axis(logits, np.broadcast_to(labels[:, None], (*logits.shape[:-1], 1)), -1)[..., 0]
    return picked - lse


def lira(
    target_phi: np.ndarray, ref_phi: np.ndarray, ref_in: np.ndarray, mode: str, use: np.ndarray | None = None
) -> np.ndarray:
    """LiRA scores (N,) of one target model; `mode`: online, offline, fixed (online with one variance per side) or
    offline-fixed.

    target_phi: (Q, N) the target's scaled logits per query (image, flip); ref_phi: (R, Q, N) the reference models';
    ref_in: (R, N) whether each reference model trained on each example; use: (R, N) which of them to fit on."""
    use = np.ones_like(ref_in) if use is None else use
    fixed = mode in ("fixed", "offline-fixed")
    out_mu, out_sd = _fit(ref_phi, ~ref_in, use, fixed=fixed)
    if mode.startswith("offline"):
        return norm.logcdf(target_phi, out_mu, out_sd).sum(0)
    in_mu, in_sd = _fit(ref_phi, ref_in, use, fixed=fixed)
    return (norm.logpdf(target_phi, in_mu, in_sd) - norm.logpdf(target_phi, out_mu, out_sd)).sum(0)


def balanced(ref_in: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(R, N) bool: the reference models to fit each example on, as many IN as OUT (one dropped at random from the
    larger side). Leaving one model of K out leaves K/2 - 1 on the target's own side of an example and K/2 on the
    other, so without this the number of models behind each fit, and with it the fits' spread, would tell membership
    by itself: a leak of the evaluation, not of the model."""
    use = np.ones_like(ref_in)
    n_in = ref_in.sum(0)
    n_out = len(ref_in) - n_in
    for n in np.flatnonzero(n_in != n_out):
        side = np.flatnonzero(ref_in[:, n] == (n_in[n] > n_out[n]))
        use[rng.choice(side, abs(int(n_in[n]) - int(n_out[n])), replace=False), n] = False
    return use


def _fit(phi: np.ndarray, side: np.ndarray, use: np.ndarray, *, fixed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-query, per-example mean and standard deviation of phi (R, Q, N) over the reference models on one `side`
    (R, N) that are in `use` (R, N).

    The deviation is the example's own where two or more models are used and `fixed` is off; otherwise one per query,
    the median over examples of the deviation over every model on that side (a deviation fitted to one model is zero,
    and would make that side's likelihood all or nothing)."""
    mu, own, count = _moments(phi, side & use)
    if np.any(count < 1):
        raise ValueError("an example has no reference model on one side (IN or OUT): train more shadow models")
    _, everyone, everyone_count = _moments(phi, side)
    if not np.any(everyone_count >= 2):
        raise ValueError("no example has two reference models on one side: train more shadow models")
    shared = np.median(everyone[:, everyone_count >= 2], axis=1, keepdims=True)  # (Q, 1)
    sd = np.where((count >= 2) & (not fixed), own, shared)
    return mu, np.maximum(sd, MIN_STD)


def _moments(phi: np.ndarray, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean (Q, N), standard deviation (Q, N) and count (N,) of phi (R, Q, N) over the models `chosen` (R, N)."""
    weights = chosen[:, None, :].astype(np.float64)
    count = chosen.sum(0)
    mu = (phi * weights).sum(0) / np.maximum(count, 1)
    sd = np.sqrt(((phi - mu) ** 2 * weights).sum(0) / np.maximum(count - 1, 1))
    return mu, sd, count


def rmia(
    target_p: np.ndarray,
    ref_p: np.ndarray,
    ref_in: np.ndarray,
    target_pop: np.ndarray,
    ref_pop: np.ndarray,
    *,
    a: float = 0.3,
    gamma: float = 1.0,
    offline: bool = True,
) -> np.ndarray:
    """RMIA scores (N,) of one target model, from probabilities of the label.

    target_p (N,), ref_p (R, N), ref_in (R, N): the target's and the reference models' p(y|x) on the examples;
    target_pop (P,), ref_pop (R, P): the same on population examples no model trained on."""
    if offline:
        out = np.where(~ref_in, ref_p, np.nan)
        prior_x = 0.5 * ((1 + a) * np.nanmean(out, 0) + (1 - a))
        prior_z = 0.5 * ((1 + a) * ref_pop.mean(0) + (1 - a))
    else:
        prior_x, prior_z = ref_p.mean(0), ref_pop.mean(0)
    ratio_x = target_p / prior_x
    ratio_z = np.sort(target_pop / prior_z)
    # The share of population examples z with ratio_x / ratio_z >= gamma, for every x at once; ties (shares come in
    # steps of 1/P, and the most confident examples all beat every z) broken by the ratio itself, within half a step.
    share = np.searchsorted(ratio_z, ratio_x / gamma, side="right") / len(ratio_z)
    return share + np.arctan(np.log(ratio_x)) / np.pi / len(ratio_z)


@dataclass(frozen=True)
class Roc:
    fpr: np.ndarray
    tpr: np.ndarray

    @classmethod
    def of(cls, scores: np.ndarray, members: np.ndarray) -> Roc:
        """Every threshold at once: sort by score, count members and non-members above each (ties kept together)."""
        order = np.argsort(-scores, kind="stable")
        s, m = scores[order], members[order]
        last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # the last index of each run of equal scores
        tp, fp = np.cumsum(m)[last], np.cumsum(~m)[last]
        return cls(np.r_[0.0, fp / max((~m).sum(), 1)], np.r_[0.0, tp / max(m.sum(), 1)])

    def tpr_at(self, fpr: float) -> float:
        """The best true-positive rate at a false-positive rate of at most `fpr`."""
        return float(self.tpr[self.fpr <= fpr].max())

    @property
    def auc(self) -> float:
        return float(np.trapezoid(self.tpr, self.fpr))


@dataclass(frozen=True)
class Result:
    attack: str
    auc: tuple[float, float, float]  # value, 95% interval low, high
    tpr: dict[str, tuple[float, float, float]]  # by FPR ("0.1%", "1%", "10%")


def judge(attack: str, scores: np.ndarray, members: np.ndarray, *, resamples: int = 200, seed: int = 0) -> Result:
    """AUC and TPR at each of FPRS, with percentile bootstrap intervals over examples."""
    roc = Roc.of(scores, members)
    rng = np.random.default_rng(seed)
    boot_auc, boot_tpr = [], []
    for _ in range(resamples):
        pick = rng.integers(0, len(scores), len(scores))
        r = Roc.of(scores[pick], members[pick])
        boot_auc.append(r.auc)
        boot_tpr.append([r.tpr_at(f) for f in FPRS])
    low_auc, high_auc = np.percentile(boot_auc, [2.5, 97.5])
    tpr_low, tpr_high = np.percentile(boot_tpr, [2.5, 97.5], axis=0)
    return Result(
        attack,
        (roc.auc, float(low_auc), float(high_auc)),
        {
            f"{f:.1%}".replace(".0%", "%"): (roc.tpr_at(f), float(lo), float(hi))
            for f, lo, hi in zip(FPRS, tpr_low, tpr_high, strict=True)
        },
    )


def leave_one_out(
    shadows, attack: str, *, references: int | None = None, shuffled: bool = False, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Every shadow model in turn as the target, the others as its references: (scores, members), flattened.

    `shadows` is splitleak.model.shadows.Shadows; `references`: use only this many of the others, drawn at random for
    each target (the same targets judged with fewer references: how TPR grows with the attacker's models);
    `shuffled`: the control, with each target's membership labels permuted, for which any attack's TPR must equal its
    FPR."""
    if references is not None and not 1 <= references < len(shadows.masks):
        raise ValueError(
            f"references must be between 1 and {len(shadows.masks) - 1} (the other models), not {references}"
        )
    labels, count = shadows.labels, len(shadows.masks)
    phi = scaled_logit(shadows.logits, labels)  # (K, Q, N)
    logp = log_softmax_at(shadows.logits, labels)  # (K, Q, N)
    p = np.exp(logp).mean(1)  # (K, N): p(y|x), averaged over the queries, as RMIA takes it
    pop = np.exp(log_softmax_at(shadows.population_logits, shadows.population_labels)).mean(1)  # (K, P)
    rng = np.random.default_rng(seed)
    all_scores, all_members = [], []
    for t in range(count):
        refs = np.arange(count) != t
        if references is not None:
            refs[rng.permutation(np.flatnonzero(refs))[references:]] = False
        # Judged: the examples with a reference model on each side (all of them when the masks are the balanced
        # ones of splitleak.model.shadows; fewer when only some of its models are used).
        ref_in = shadows.masks[refs]
        judged = ref_in.any(0) & (~ref_in).any(0)
        ref_in = ref_in[:, judged]
        if attack == "loss":
            scores = logp[t][:, judged].mean(0)
        elif attack.startswith("lira-"):
            use = balanced(ref_in, rng)
            scores = lira(phi[t][:, judged], phi[refs][..., judged], ref_in, attack.removeprefix("lira-"), use)
        elif attack == "rmia":
            scores = rmia(p[t][judged], p[refs][:, judged], ref_in, pop[t], pop[refs])
        else:
            raise ValueError(f"no membership attack {attack!r}; attacks: {', '.join(ATTACKS)}")
        members = shadows.masks[t][judged]
        all_scores.append(scores)
        all_members.append(rng.permutation(members) if shuffled else members)
    return np.concatenate(all_scores), np.concatenate(all_members)


def markdown(results: list[Result], models: int, references: int | None = None) -> str:
    refs = "the others" if references is None else f"{references} of the others, drawn at random,"
    lines = [
        f"Leave one out over {models} shadow models: each in turn the target, {refs} its references.",
        "",
        "| attack | AUC | TPR at 0.1% FPR | TPR at 1% FPR | TPR at 10% FPR |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        cells = [f"{r.auc[0]:.3f} ({r.auc[1]:.3f}-{r.auc[2]:.3f})"]
        cells += [f"{v:.2%} ({lo:.2%}-{hi:.2%})" for v, lo, hi in r.tpr.values()]
        lines.append(f"| {r.attack} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rocs: dict[str, Roc], out: Path) -> None:
    """The ROC curves on log-log axes, where the low-FPR regime the paper argues for is visible."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    for name, roc in rocs.items():
        ax.loglog(np.maximum(roc.fpr, 1e-5), np.maximum(roc.tpr, 1e-5), label=f"{name} (AUC {roc.auc:.3f})")
    ax.plot([1e-5, 1], [1e-5, 1], "k:", lw=0.8, label="chance")
    ax.set(xlim=(1e-4, 1), ylim=(1e-4, 1), xlabel="false-positive rate", ylabel="true-positive rate")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shadows", type=Path, required=True, help="a folder `splitleak shadows` wrote")
    parser.add_argument("--attack", action="append", choices=ATTACKS, help="(repeat; default: all)")
    parser.add_argument("--out", type=Path, help="where the table, JSON and ROC plot go (default: SHADOWS/membership)")
    parser.add_argument("--resamples", type=int, default=200, help="bootstrap resamples for the intervals")
    parser.add_argument("--models", type=int, help="use only the first N shadow models (default: every finished one)")
    parser.add_argument(
        "--references",
        type=int,
        help="judge every model against only R of the others, drawn at random (default: all of them); the same "
        "targets with fewer references show what more reference models buy",
    )
    return parser


def main(args: argparse.Namespace) -> int:
    from splitleak.model.shadows import Shadows

    shadows = Shadows.load(args.shadows, args.models)
    folder = f"{len(shadows.masks)}-models" + (f"-{args.references}-references" if args.references else "")
    out = args.out or args.shadows / "membership" / folder
    out.mkdir(parents=True, exist_ok=True)
    results, rocs = [], {}
    for attack in args.attack or ATTACKS:
        scores, members = leave_one_out(shadows, attack, references=args.references)
        results.append(judge(attack, scores, members, resamples=args.resamples))
        rocs[attack] = Roc.of(scores, members)
    control_attack = "lira-online" if len(shadows.masks) > 2 else "loss"
    scores, members = leave_one_out(shadows, control_attack, references=args.references, shuffled=True)
    control = judge("shuffled control", scores, members, resamples=args.resamples)
    table = markdown([*results, control], len(shadows.masks), args.references)
    (out / "membership.md").write_text(table)
    (out / "membership.json").write_text(json.dumps([asdict(r) for r in [*results, control]], indent=1) + "\n")
    plot(rocs, out / "roc.png")
    print(table, end="")
    print(f"wrote {out / 'membership.md'}, {out / 'membership.json'} and {out / 'roc.png'}")
    return 0
