"""`decoder`: the black-box inverse network.

He, Zhang and Lee, "Model inversion attacks against collaborative inference" (ACSAC 2019), Section 5.1, Eq. 4 and
Algorithm 2: the attacker cannot see the head's weights but can query it (as any app user can), so it feeds the head
auxiliary images of the same kind as the victim's, keeps the (activation, image) pairs, and trains a network g to
minimise the mean of ||g(head(x)) - x||^2 over them. One forward pass of g then inverts each intercepted activation.
Trained with Adam rather than the paper's SGD, from PyTorch's default initialisation rather than Xavier's; auxiliary
images from the target's training set are the paper's "same set" case (Table 4).

Against a defended device (splitleak.core.defences) the attacker adapts, as a real one would: knowing the defence
and its strength (a phone app's defence is no secret), it first trains the undefended decoder, then goes on training
it for `adapt_epochs` on activations that pass through the same defence, restored as the cloud restores them.

The network g is splitleak.model.inverse.build_decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from splitleak.attacker.attacks.base import Attack, adaptive_knobs, cache_path, check_positive, query, session
from splitleak.core import defences
from splitleak.model.inverse import build_decoder


class InverseNetwork(Attack):
    name = "decoder"
    knowledge = "Black-box queries to the head on auxiliary images of the same kind as the victim's, none of them."
    needs_auxiliary = True
    adaptive = True
    exportable = True

    @dataclass(frozen=True)
    class Knobs:
        epochs: int = 10
        batch_size: int = 64
        lr: float = 1e-3
        width: int = 64
        seed: int = 0
        adapt_epochs: int = 2

        def __post_init__(self) -> None:
            check_positive(self, "epochs", "batch_size", "lr", "width", "adapt_epochs")

    def __init__(self, **given) -> None:
        super().__init__(**given)
        k, auxiliary = self.knobs, self.auxiliary
        undefended_knobs, knobs = adaptive_knobs(self)
        undefended = self.defence.name == "none"
        path = cache_path(self.name, self.manifest, self.split.name, knobs, auxiliary)
        if path.exists():
            self.decoder = build_decoder(self.split.activation_shape, self.image_shape, k.width)
            self.decoder.load_state_dict(torch.load(path, weights_only=True))
        elif undefended:
            torch.manual_seed(k.seed)  # the initial weights too, or no two trainings (or sweep workers) would agree
            self.decoder = build_decoder(self.split.activation_shape, self.image_shape, k.width)
            self._train(epochs=k.epochs)
            torch.save(self.decoder.state_dict(), path)
        else:
            start = InverseNetwork(
                manifest=self.manifest,
                split=self.split.name,
                auxiliary=auxiliary,
                progress=self.progress,
                **undefended_knobs,
            )
            self.decoder = start.decoder
            self._train(epochs=k.adapt_epochs)
            torch.save(self.decoder.state_dict(), path)
        self.decoder.eval()

    def network(self) -> torch.nn.Module:
        return self.decoder

    def _train(self, *, epochs: int) -> None:
        from tqdm import tqdm

        auxiliary, batch_size, seed = self.auxiliary, self.knobs.batch_size, self.knobs.seed
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        head = session(self.split.head)
        optimizer = torch.optim.Adam(self.decoder.parameters(), lr=self.knobs.lr)
        steps = -(-len(auxiliary) // batch_size)
        self.decoder.train()
        # Counted in batches, not epochs, so that the bar moves and its ETA holds from the first seconds on.
        bar = tqdm(
            total=epochs * steps, desc=f"{self.name} at {self.split.name}", unit="batch", disable=not self.progress
        )
        for epoch in range(epochs):
            order = rng.permutation(len(auxiliary))
            bar.set_postfix_str(f"epoch {epoch + 1}/{epochs}")
            for step in range(steps):
                images = auxiliary[order[step * batch_size : (step + 1) * batch_size]]
                # Queried afresh each epoch rather than stored: at early split points the activations of a full
                # data set run to gigabytes, and the head costs less than the decoder's backward pass.
                received = defences.as_received(self.defence, query(head, self.manifest, images), rng)
                activation = torch.from_numpy(received)
                target = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255)  # (B, C, H, W)
                loss = F.mse_loss(self.decoder(activation), target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                bar.update()
        bar.close()

    @torch.inference_mode()
    def _invert(self, activations: np.ndarray) -> np.ndarray:
        batch = 256
        return np.concatenate(
            [
                self.decoder(torch.from_numpy(activations[i : i + batch])).permute(0, 2, 3, 1).numpy()
                for i in range(0, len(activations), batch)
            ]
        )
