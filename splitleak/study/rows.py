"""The sweep's rows: one SweepRow per configuration and link, and the flat table they are written as.

`splitleak sweep` writes its rows as sweep.json and sweep.csv with one flat column per number: `{attack}_{score}`
for each attack's scores, `max_ssim`, and `{stage}_ms_{statistic}` for each stage's latency. Those names are built
and parsed here only (`SweepRow.to_flat`, `SweepRow.from_flat`), so tables written before the type existed load as
they are and write back the same; the sweep, its plots, `splitleak recommend` and the benchmarks read typed rows.
"""

from __future__ import annotations

import csv
import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

# The stages a frame's latency is made of, in the order they happen; their sum is the row's total.
LATENCY_STAGES = ("device", "uplink", "cloud", "downlink", "transport")
# Columns that hold words, and the one that holds a yes or no; every other column holds a number.
WORDS = ("model", "split", "defence", "link", "device")
YES_NO = "training_time"


@dataclass(frozen=True)
class AttackScores:
    """How well one attack inverted a configuration's frames (splitleak.attacker.scoring), over those frames."""

    psnr: float  # mean, dB
    ssim: float  # mean, 0 to 1
    recognisable: float  # the share of frames with SSIM of at least RECOGNISABLE_SSIM
    label_leakage: float  # the share of reconstructions the cloud's classifier labels as their originals


@dataclass(frozen=True)
class Latency:
    """One stage's time per frame over a configuration's frames, ms."""

    median: float
    p95: float


@dataclass(frozen=True)
class SweepRow:
    """One configuration (model, split point, defence at a strength) on one link."""

    model: str
    split: str
    defence: str  # for a model variant, the training-time defence it was trained with
    strength: float
    training_time: bool  # a model variant trained with the defence, not a transform at run time
    frames: int  # streamed: accuracy, bytes and latency come from all of them
    accuracy: float  # the share of frames the cloud classified right
    accuracy_drop: float  # points lost from the undefended base model
    bytes_up: float  # median request size
    attacks: dict[str, AttackScores]  # by attack's name, in the order they ran
    link: str
    latency_ms: dict[str, Latency]  # by stage: LATENCY_STAGES, then "total" (their sum, frame by frame)
    device: str = "host"  # the device profile (splitleak.core.compute); its column is written only when not "host"

    @property
    def max_ssim(self) -> float:
        """The strongest attack's SSIM (NaN with no attacks): the configuration is private below RECOGNISABLE_SSIM."""
        return max((scores.ssim for scores in self.attacks.values()), default=float("nan"))

    def total_ms(self, statistic: str = "median") -> float:
        """The total latency per frame: its "median" or "p95"."""
        return asdict(self.latency_ms["total"])[statistic]

    def to_flat(self) -> dict:
        """The row as the table's columns, in the order the sweep has always written them."""
        skip = ("attacks", "link", "latency_ms", "device")
        flat = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        for attack, scores in self.attacks.items():
            flat |= {f"{attack}_{score}": value for score, value in asdict(scores).items()}
        flat |= {"max_ssim": self.max_ssim, "link": self.link}
        if self.device != "host":  # so that a table of the host alone is written as before profiles existed
            flat["device"] = self.device
        for stage, latency in self.latency_ms.items():
            flat |= {latency_column(stage, statistic): value for statistic, value in asdict(latency).items()}
        return flat

    @classmethod
    def from_flat(cls, flat: dict) -> SweepRow:
        """A row from its columns, as `to_flat` writes them (max_ssim is worked out again, not read)."""
        attacks = [c.removesuffix("_ssim") for c in flat if c.endswith("_ssim") and c != "max_ssim"]
        stages = [c.removesuffix("_ms_median") for c in flat if c.endswith("_ms_median")]
        return cls(
            **{f.name: flat[f.name] for f in fields(cls) if f.name not in ("attacks", "latency_ms", "device")},
            device=flat.get("device") or "host",  # a CSV leaves the cell empty on a host row
            attacks={
                attack: AttackScores(**{f.name: flat[f"{attack}_{f.name}"] for f in fields(AttackScores)})
                for attack in attacks
            },
            latency_ms={
                stage: Latency(**{f.name: flat[latency_column(stage, f.name)] for f in fields(Latency)})
                for stage in stages
            },
        )


def latency_column(stage: str, statistic: str) -> str:
    """The column of a stage's latency statistic: ("total", "median") -> "total_ms_median"."""
    return f"{stage}_ms_{statistic}"


def write_json(table: list[SweepRow], path: Path) -> None:
    path.write_text(json.dumps([row.to_flat() for row in table], indent=1))


def read_json(path: Path) -> list[SweepRow]:
    return [SweepRow.from_flat(flat) for flat in json.loads(path.read_text())]


def write_csv(table: list[SweepRow], path: Path) -> None:
    flat = [row.to_flat() for row in table]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, list(dict.fromkeys(column for row in flat for column in row)))
        writer.writeheader()
        writer.writerows(flat)


def read_csv(path: Path) -> list[SweepRow]:
    """The rows of a sweep.csv, each cell read back as what the sweep wrote: a word, True or False, or a number."""
    with open(path, newline="") as f:
        return [
            SweepRow.from_flat({column: _cell(column, text) for column, text in row.items()})
            for row in csv.DictReader(f)
        ]


def _cell(column: str, text: str) -> str | bool | int | float:
    if column in WORDS:
        return text
    if column == YES_NO:
        return text == "True"
    try:
        return int(text)  # the frame count, and any number the sweep wrote without a point
    except ValueError:
        return float(text)
