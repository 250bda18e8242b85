"""`shadow`: the query-free attack, rMLE against a shadow head that the cloud trains through its own tail.

He, Zhang and Lee, "Model inversion attacks against collaborative inference" (ACSAC 2019), Section 6: the attacker
can neither read the head's weights nor query it, but knows its architecture (here the zoo model that the manifest
names, cut at the same split point), holds the tail (the cloud runs it) and has labelled auxiliary images of the same
kind as the victim's. It trains a shadow head, freshly initialised, so that the frozen tail classifies the auxiliary
images correctly through it,

    min_theta  sum_(x, y) CE(tail(shadow_theta(x)), y),

which pushes the shadow to emit what the tail expects, that is, to mimic the real head. It then runs the white-box
attack (rMLE, Section 4) against the shadow head in place of the real one.

The gradients need the tail as a white box: its ONNX file, converted with onnx2torch and frozen, as He et al.
assume of a cloud that owns its model. The trained shadow head is exported to ONNX in the attack cache, and rMLE is
handed a manifest in which that file stands in for the head, so the real head's file is never read.
"""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import onnx2torch
import torch
import torch.nn.functional as F

from splitleak.attacker.attacks.base import Attack, cache_path, check_positive, model_input
from splitleak.attacker.attacks.rmle import RegularizedMLE
from splitleak.core.manifest import Manifest
from splitleak.model import zoo
from splitleak.model.export import export_onnx


class ShadowModel(Attack):
    name = "shadow"
    knowledge = (
        "The head's architecture but neither its weights nor queries to it; the tail as a white box (the cloud's own "
        "model); labelled auxiliary images of the same kind as the victim's, none of them."
    )

    def __init__(
        self,
        *,
        manifest: Manifest,
        split: str,
        auxiliary: np.ndarray,
        auxiliary_labels: np.ndarray,
        epochs: int = 5,
        batch_size: int = 64,
        lr: float = 1e-3,
        steps: int = 5000,
        tv_weight: float = 0.0,
        seed: int = 0,
        progress: bool = False,
    ) -> None:
        super().__init__(manifest=manifest, split=split)
        check_positive(epochs=epochs, batch_size=batch_size, lr=lr, steps=steps)
        if auxiliary is None or len(auxiliary) == 0:
            raise ValueError("the shadow attack needs labelled auxiliary images to train its shadow head on")
        if auxiliary.dtype != np.uint8 or auxiliary.shape[1:] != self.image_shape:
            raise ValueError(
                f"auxiliary images must be uint8 {self.image_shape} (N, H, W, C) like the model's input, not "
                f"{auxiliary.dtype} {auxiliary.shape[1:]}"
            )
        labels = np.asarray(auxiliary_labels)
        if labels.shape != (len(auxiliary),) or not ((labels >= 0) & (labels < len(manifest.classes))).all():
            raise ValueError(
                f"auxiliary_labels must hold one class index in [0, {len(manifest.classes)}) per auxiliary image"
            )
        if manifest.model not in zoo.ZOO:
            raise ValueError(f"the shadow head is built from the zoo, which has no {manifest.model!r}")
        knobs = {
            "epochs": epochs,
            "batch_size": batch_size,
            "lr": lr,
            "seed": seed,
            "labels": hashlib.sha256(labels.astype(np.int64).tobytes()).hexdigest(),
        }
        path = cache_path(self.name, manifest, split, knobs, auxiliary).with_suffix(".onnx")
        if not path.exists():
            shadow = self._train(
                auxiliary, labels, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, progress=progress
            )
            export_onnx(shadow.eval(), torch.zeros(2, *manifest.input_shape), path, "image", "activation")
        stand_in = dataclasses.replace(self.split, head=path)
        shadow_manifest = dataclasses.replace(manifest, splits={**manifest.splits, split: stand_in})
        self.rmle = RegularizedMLE(
            manifest=shadow_manifest, split=split, steps=steps, tv_weight=tv_weight, batch_size=batch_size
        )

    def _train(
        self,
        auxiliary: np.ndarray,
        labels: np.ndarray,
        *,
        epochs: int,
        batch_size: int,
        lr: float,
        seed: int,
        progress: bool,
    ) -> torch.nn.Module:
        from tqdm import tqdm

        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        c = self.manifest.input_shape[0]
        shadow, _ = zoo.split(
            zoo.build(self.manifest.model, num_classes=len(self.manifest.classes), in_channels=c), self.split.name
        )
        tail = onnx2torch.convert(str(self.split.tail)).eval()  # eval: its batch norms keep the cloud's statistics
        tail.requires_grad_(False)
        optimizer = torch.optim.Adam(shadow.parameters(), lr=lr)
        shadow.train()
        for _ in tqdm(range(epochs), desc=f"{self.name}: shadow head at {self.split.name}", disable=not progress):
            for batch in np.array_split(rng.permutation(len(auxiliary)), -(-len(auxiliary) // batch_size)):
                x = torch.from_numpy(model_input(self.manifest, auxiliary[batch]))
                loss = F.cross_entropy(tail(shadow(x)), torch.from_numpy(labels[batch].astype(np.int64)))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return shadow

    def _invert(self, activations: np.ndarray) -> np.ndarray:
        return self.rmle.invert(activations)
