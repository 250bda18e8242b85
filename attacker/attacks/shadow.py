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
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from splitleak.attacker.attacks.base import Attack, cache_path, check_positive, model_input, to_torch
from splitleak.attacker.attacks.rmle import RegularizedMLE
from splitleak.model import zoo
from splitleak.model.export import export_onnx


class ShadowModel(Attack):
    name = "shadow"
    knowledge = (
        "The head's architecture but neither its weights nor queries to it; the tail as a white box (the cloud's own "
        "model); labelled auxiliary images of the same kind as the victim's, none of them."
    )

    needs_auxiliary = True
    needs_labels = True

    @dataclass(frozen=True)
    class Knobs:
        epochs: int = 5
        batch_size: int = 64
        lr: float = 1e-3
        steps: int = 5000
        tv_weight: float = 0.0
        seed: int = 0

        def __post_init__(self) -> None:
            check_positive(self, "epochs", "batch_size", "lr", "steps")

    def __init__(self, **given) -> None:
        super().__init__(**given)
        manifest, split, k, labels = self.manifest, self.split.name, self.knobs, self.auxiliary_labels
        if manifest.model not in zoo.ZOO:
            raise ValueError(f"the shadow head is built from the zoo, which has no {manifest.model!r}")
        knobs = {
            "epochs": k.epochs,
            "batch_size": k.batch_size,
            "lr": k.lr,
            "seed": k.seed,
            "labels": hashlib.sha256(labels.astype(np.int64).tobytes()).hexdigest(),
        }
        path = cache_path(self.name, manifest, split, knobs, self.auxiliary).with_suffix(".onnx")
        if not path.exists():
            shadow = self._train()
            export_onnx(shadow.eval(), torch.zeros(2, *manifest.input_shape), path, "image", "activation")
        stand_in = dataclasses.replace(self.split, head=path)
        shadow_manifest = dataclasses.replace(manifest, splits={**manifest.splits, split: stand_in})
        self.rmle = RegularizedMLE(
            manifest=shadow_manifest, split=split, steps=k.steps, tv_weight=k.tv_weight, batch_size=k.batch_size
        )

    def _train(self) -> torch.nn.Module:
        from tqdm import tqdm

        auxiliary, labels, k = self.auxiliary, self.auxiliary_labels, self.knobs
        torch.manual_seed(k.seed)
        rng = np.random.default_rng(k.seed)
        c = self.manifest.input_shape[0]
        shadow, _ = zoo.split(
            zoo.build(self.manifest.model, num_classes=len(self.manifest.classes), in_channels=c), self.split.name
        )
        tail = to_torch(self.split.tail)  # eval: its batch norms keep the cloud's statistics
        tail.requires_grad_(False)
        optimizer = torch.optim.Adam(shadow.parameters(), lr=k.lr)
        shadow.train()
        desc = f"{self.name}: shadow head at {self.split.name}"
        for _ in tqdm(range(k.epochs), desc=desc, disable=not self.progress):
            for batch in np.array_split(rng.permutation(len(auxiliary)), -(-len(auxiliary) // k.batch_size)):
                x = torch.from_numpy(model_input(self.manifest, auxiliary[batch]))
                loss = F.cross_entropy(tail(shadow(x)), torch.from_numpy(labels[batch].astype(np.int64)))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        return shadow

    def _invert(self, activations: np.ndarray) -> np.ndarray:
        return self.rmle.invert(activations)
