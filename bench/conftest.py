"""What the benchmarks share: a model to time and the side-by-side ratio each file reports.

Run them with `make bench` (pytest-benchmark; `--benchmark-disable`, the default in pyproject, runs each once).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from splitleak.core import manifest


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """The shipped ResNet-20; when it is absent, a random-init one (timing does not depend on the weights)."""
    if (manifest.DEFAULT_MODEL_DIR / "manifest.json").exists():
        return manifest.DEFAULT_MODEL_DIR
    return export_random("resnet20", tmp_path_factory.mktemp("resnet20-random"))


def export_random(model: str, out: Path) -> Path:
    """A random-init zoo model exported for CIFAR-sized input: enough for timing, which ignores the weights."""
    from splitleak.model import export, zoo

    entry = zoo.ZOO[model]
    export.export(
        zoo.build(model),
        out,
        name=f"{model}-cifar10",
        model_name=model,
        dataset="cifar10",
        classes=[str(i) for i in range(10)],
        input_shape=(3, 32, 32),
        mean=[0.5] * 3,
        std=[0.25] * 3,
        split_points=entry.split_points,
        default_split=entry.default_split,
    )
    return out


class Ratios:
    """Medians of benchmarks run side by side, and each one's ratio to its baseline."""

    def __init__(self) -> None:
        self.medians: dict[str, float] = {}

    def record(self, benchmark, name: str, baseline: str | None = None) -> float | None:
        if benchmark.stats is None:  # --benchmark-disable: ran once, untimed
            return None
        self.medians[name] = benchmark.stats.stats.median
        if baseline is None or baseline not in self.medians:
            return None
        ratio = self.medians[name] / self.medians[baseline]
        benchmark.extra_info["ratio"] = round(ratio, 3)
        print(
            f"\n{name}: {self.medians[name] * 1e3:.3f} ms, {baseline}: {self.medians[baseline] * 1e3:.3f} ms "
            f"(medians): ratio {ratio:.2f}"
        )
        return ratio


@pytest.fixture(scope="session")
def ratios() -> Ratios:
    return Ratios()
