"""The head as the app ships it: the first half of the model, an ONNX file and its manifest, run with ONNX Runtime.

Phone-safe, as all of splitleak.device is: ONNX Runtime and numpy, never torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from splitleak.core import manifest


class Head:
    """The first half of the model, as the app ships it: an ONNX file and its manifest."""

    def __init__(
        self, model_dir: str | Path = manifest.DEFAULT_MODEL_DIR, split: str | None = None, threads: int = 1
    ) -> None:
        self.manifest = manifest.load(model_dir)
        self.split = self.manifest.split(split)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(self.split.head), options, providers=["CPUExecutionProvider"])

    @property
    def served_name(self) -> str:
        return self.manifest.served_name(self.split.name)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Normalised float32 (B, C, H, W) -> activation (B, *activation_shape)."""
        return self.session.run(["activation"], {"image": x})[0]
