"""The head as the app ships it: the first half of the model, an ONNX file and its manifest, run with ONNX Runtime.

Phone-safe, as all of splitleak.device is: ONNX Runtime and numpy, never torch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from splitleak.core import manifest


@dataclass(frozen=True)
class TimeModel:
    """A device `slowdown` times slower than this host, by the time model (splitleak.core.compute): each split's
    head takes its CPU time on this host (`host_ms`) times the slowdown."""

    host_ms: dict[str, float]
    slowdown: float

    def head_s(self, split: str) -> float:
        return self.host_ms[split] * self.slowdown / 1e3


class Head:
    """The first half of the model, as the app ships it: an ONNX file and its manifest. With a `time_model`, each run
    takes as long as the model says this head takes on the slower device (or longer, if this host is slower yet)."""

    def __init__(
        self,
        model_dir: str | Path = manifest.DEFAULT_MODEL_DIR,
        split: str | None = None,
        threads: int = 1,
        time_model: TimeModel | None = None,
    ) -> None:
        self.manifest = manifest.load(model_dir)
        self.split = self.manifest.split(split)
        self.threads, self.time_model = threads, time_model
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.split.head), options, providers=["CPUExecutionProvider"])

    @property
    def served_name(self) -> str:
        return self.manifest.served_name(self.split.name)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Normalised float32 (B, C, H, W) -> activation (B, *activation_shape)."""
        start = time.perf_counter()
        activation = self.session.run(["activation"], {"image": x})[0]
        if self.time_model is not None:
            left = start + self.time_model.head_s(self.split.name) * len(x) - time.perf_counter()
            if left > 0:
                time.sleep(left)
        return activation
