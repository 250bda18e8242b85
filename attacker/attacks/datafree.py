"""`datafree`: Divide-and-Conquer Inversion (DCI), an attacker with the head and no data at all.

Dong, Yin, Alvarez, Kautz, Molchanov and Kung, "Privacy vulnerability of split computing to data-free model
inversion attacks" (2021, arXiv:2107.06304), in three steps:

1. Synthesise images from the head alone, as DeepInversion does (Yin et al., "Dreaming to distill", CVPR 2020,
   less its classification term, which needs the tail): start from noise and descend on
   sum_l ||mu_l(x) - running_mean_l||_2 + ||sigma^2_l(x) - running_var_l||_2 over the head's batch norms, plus an l2
   total-variation and an l2 prior on the normalised image, with random shifts and flips every step.
2. Divide: cut the head into blocks where one tensor alone is in flight into a convolution (a residual block, or a
   conv and its ReLU in a plain chain) and train one small inverse network per block on the synthetic images, each
   to map its block's output back to its input with cycle consistency: the inverse's output, re-encoded by the
   block, must give the block's output again.
3. Conquer: chain the inverses from the activation back to the image and fine-tune them together on the same two
   terms, the image and the head's re-encoding of it. Inverting an activation is then one forward pass.

Against a defended device the attacker, told the defence and its strength, adapts as the decoder does: it trains
the undefended inverses, then goes on for `adapt_epochs` with the activation passed through the same defence
(restored as the cloud restores it) on its way into the last inverse, the targets staying the clean features.

Each term is a mean squared error divided by its target's variance, so blocks and terms of different scales weigh
alike. The statistics are in the head only when its ONNX file keeps BatchNormalization nodes: an exporter that folds
them into the convolutions (torch.onnx's default constant folding, TFLite, Core ML) leaves nothing to match.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from onnx2torch.node_converters.batch_norm import OnnxBatchNorm
from torch import fx, nn

from splitleak.attacker.attacks.base import (
    Attack,
    adaptive_knobs,
    cache_path,
    check_not_negative,
    check_positive,
    to_torch,
)
from splitleak.attacker.attacks.rmle import total_variation
from splitleak.core import defences
from splitleak.core.manifest import Manifest

# As in DeepInversion's code, the first batch norm counts ten times as much as the others: it alone sees the image's
# colours and edges. The priors' weights were tuned at the stem of ResNet-20 on CIFAR-10 (pixels in [0, 1]): a TV
# weight of 1 leaves the synthetic images noisy and 100 leaves them flat; inverses trained on those of 10 do best.
FIRST_BN_WEIGHT = 10.0
TV_WEIGHT = 10.0
L2_WEIGHT = 1e-4
SYNTHESIS_LR = 0.05
JITTER = 2  # pixels of random shift per synthesis step
SYNTHESIS_KNOBS = ("synthetic_images", "synthesis_steps", "batch_size", "seed")  # what step 1 depends on


def blocks_of(head: fx.GraphModule) -> list[fx.GraphModule]:
    """The head cut into a chain of blocks: a cut falls after a node whose output is the only tensor in flight (all
    others are constants) and feeds a convolution, so each block is one residual block, or one conv and what follows
    it, and each block's output is the next one's only input."""
    nodes = list(head.graph.nodes)
    order = {node: i for i, node in enumerate(nodes)}
    dynamic: set[fx.Node] = set()  # the nodes that depend on the image; the rest are weights and constants
    for node in nodes:
        if node.op == "placeholder" or any(arg in dynamic for arg in node.all_input_nodes):
            dynamic.add(node)
    last_use = {node: max((order[user] for user in node.users), default=order[node]) for node in nodes}

    def is_conv(node: fx.Node) -> bool:
        return node.op == "call_module" and isinstance(head.get_submodule(node.target), nn.modules.conv._ConvNd)

    output = nodes[-1]
    cuts, in_flight = [], set()
    for i, node in enumerate(nodes[:-1]):
        if node in dynamic:
            in_flight = {n for n in in_flight | {node} if last_use[n] > i}
            if in_flight == {node} and (node.op == "placeholder" or any(is_conv(u) for u in node.users)):
                cuts.append(node)
    cuts.append(output.all_input_nodes[0])
    return [_subgraph(head, nodes, start, end) for start, end in zip(cuts, cuts[1:], strict=False)]


def _subgraph(head: fx.GraphModule, nodes: list[fx.Node], start: fx.Node, end: fx.Node) -> fx.GraphModule:
    """The nodes after `start` up to `end`, as a module from start's tensor to end's; it shares the head's weights."""
    graph = fx.Graph()
    env = {start: graph.placeholder("x")}

    def copy(node: fx.Node) -> fx.Node:
        if node not in env:  # a constant the block needs, or a node of the block itself
            env[node] = graph.node_copy(node, copy)
        return env[node]

    for node in nodes[nodes.index(start) + 1 : nodes.index(end) + 1]:
        copy(node)
    graph.output(env[end])
    return fx.GraphModule(head, graph)


def inverse_block(block_out: tuple[int, ...], block_in: tuple[int, ...], width: int) -> nn.Sequential:
    """A small network from a block's output (C, h, w) back to its input (C', H, W): a conv in, one stride-2
    transposed convolution per halving of the side that the block did, and a conv out."""
    (c_out, h, w), (c_in, height, width_px) = block_out, block_in
    hidden = max(width, c_out)
    layers: list[nn.Module] = [nn.Conv2d(c_out, hidden, 3, padding=1), nn.BatchNorm2d(hidden), nn.ReLU()]
    while 2 * h <= height and 2 * w <= width_px:
        layers += [nn.ConvTranspose2d(hidden, hidden, 4, stride=2, padding=1), nn.BatchNorm2d(hidden), nn.ReLU()]
        h, w = 2 * h, 2 * w  # (B, hidden, 2h, 2w)
    if (h, w) != (height, width_px):
        layers.append(nn.Upsample(size=(height, width_px), mode="bilinear"))
    layers.append(nn.Conv2d(hidden, c_in, 3, padding=1))  # (B, C', H, W), the block's input, unbounded
    return nn.Sequential(*layers)


def relative_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(prediction, target) / target.var().clamp_min(1e-8)


class DivideAndConquerInversion(Attack):
    name = "datafree"
    knowledge = (
        "The head's architecture and weights (its ONNX file, pulled out of the app), batch-norm statistics "
        "included, and no data at all."
    )
    adaptive = True
    exportable = True  # the chained inverses are one network: the live attacker runs it with ONNX Runtime

    @dataclass(frozen=True)
    class Knobs:
        synthetic_images: int = 256
        synthesis_steps: int = 300
        epochs: int = 30
        batch_size: int = 64
        lr: float = 1e-3
        width: int = 64
        cycle_weight: float = 1.0
        seed: int = 0
        adapt_epochs: int = 10

        def __post_init__(self) -> None:
            names = ("synthetic_images", "synthesis_steps", "epochs", "batch_size", "lr", "width", "adapt_epochs")
            check_positive(self, *names)
            check_not_negative(self, "cycle_weight")

    def __init__(self, **given) -> None:
        super().__init__(**given)
        manifest, split, k = self.manifest, self.split.name, self.knobs
        self._rng = np.random.default_rng(k.seed)
        head = to_torch(self.split.head)
        head.requires_grad_(False)
        if not batch_norms_of(head):
            raise ValueError(
                f"{self.split.head} has no BatchNormalization nodes, so the data-free attack has no statistics to "
                f"synthesise images from: the model has no batch norm ({manifest.model} at {split}), or its exporter "
                "folded them into the convolutions (export with do_constant_folding=False to keep them)"
            )
        self.mean = torch.from_numpy(manifest.mean)[:, None, None]
        self.std = torch.from_numpy(manifest.std)[:, None, None]
        self.blocks = blocks_of(head)
        shapes = self._shapes()
        self.inverses = nn.ModuleList(inverse_block(shapes[j + 1], shapes[j], k.width) for j in range(len(self.blocks)))
        undefended_knobs, knobs = adaptive_knobs(self)
        undefended = self.defence.name == "none"
        path = cache_path(self.name, manifest, split, knobs)
        train = dict(batch_size=k.batch_size, lr=k.lr, cycle_weight=k.cycle_weight, progress=self.progress)
        if path.exists():
            self.inverses.load_state_dict(torch.load(path, weights_only=True))
        else:
            synthetic = synthetic_images(manifest, split, k, head=head, progress=self.progress)
            if not undefended:  # start from the undefended inverses
                start = DivideAndConquerInversion(
                    manifest=manifest, split=split, progress=self.progress, **undefended_knobs
                )
                self.inverses.load_state_dict(start.inverses.state_dict())
            torch.manual_seed(k.seed)
            self._train(synthetic, epochs=k.epochs if undefended else k.adapt_epochs, **train)
            torch.save(self.inverses.state_dict(), path)
        self.inverses.eval()

    def _shapes(self) -> list[tuple[int, ...]]:
        """The shape (C, H, W) of each block's input, and of the last block's output."""
        x = torch.zeros(1, *self.manifest.input_shape)
        shapes = [tuple(x.shape[1:])]
        with torch.no_grad():
            for block in self.blocks:
                x = block(x)
                shapes.append(tuple(x.shape[1:]))
        return shapes

    def _encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Normalised images -> [x, block 1's output, ..., the activation]."""
        features = [x]
        for block in self.blocks:
            features.append(block(features[-1]))
        return features

    def _train(
        self, synthetic: torch.Tensor, *, epochs: int, batch_size: int, lr: float, cycle_weight: float, progress: bool
    ) -> None:
        from tqdm import tqdm

        stages = {"divide": self._divide_loss}
        if len(self.blocks) > 1:  # with one block, conquering would train the same inverse on the same terms again
            stages["conquer"] = self._conquer_loss
        for stage, loss_of in stages.items():
            optimizer = torch.optim.Adam(self.inverses.parameters(), lr=lr)
            self.inverses.train()
            for _ in tqdm(range(epochs), desc=f"{self.name}: {stage}", disable=not progress, leave=False):
                for batch in torch.randperm(len(synthetic)).split(batch_size):
                    x = synthetic[batch]
                    # Flipped and shifted copies: the synthetic set is small, and an inverse must not learn it by heart.
                    x = torch.where(torch.rand(len(x), 1, 1, 1) < 0.5, x.flip(3), x)
                    x = torch.roll(x, shifts=tuple(torch.randint(-4, 5, (2,)).tolist()), dims=(2, 3))
                    with torch.no_grad():
                        features = self._encode(x)
                        observed = torch.from_numpy(defences.as_received(self.defence, features[-1].numpy(), self._rng))
                    loss = loss_of(features, observed, cycle_weight)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()

    def _divide_loss(self, features: list[torch.Tensor], observed: torch.Tensor, cycle_weight: float) -> torch.Tensor:
        """Each block's inverse, alone: back to the block's input, and through the block again to its output.
        The last inverse starts from the activation as `observed` (defended, where there is a defence)."""
        loss = torch.zeros(())
        inputs = [*features[1:-1], observed]
        for k, (block, inverse) in enumerate(zip(self.blocks, self.inverses, strict=True)):
            guess = inverse(inputs[k])
            loss = loss + relative_error(guess, features[k])
            loss = loss + cycle_weight * relative_error(block(guess), features[k + 1])
        return loss

    def _conquer_loss(self, features: list[torch.Tensor], observed: torch.Tensor, cycle_weight: float) -> torch.Tensor:
        """The chained inverses: from the activation to the image, and the head's re-encoding of that image."""
        image = self._decode(observed)
        return relative_error(image, features[0]) + cycle_weight * relative_error(self._encode(image)[-1], features[-1])

    def _decode(self, activation: torch.Tensor) -> torch.Tensor:
        return decode(self.inverses, activation)  # (B, C, H, W), normalised

    def network(self) -> nn.Module:
        return ChainedInverses(self.inverses, self.mean, self.std).eval()

    @torch.inference_mode()
    def _invert(self, activations: np.ndarray) -> np.ndarray:
        batch, network = 256, self.network()
        return np.concatenate(
            [
                network(torch.from_numpy(activations[i : i + batch])).permute(0, 2, 3, 1).numpy()
                for i in range(0, len(activations), batch)
            ]
        )


class ChainedInverses(nn.Module):
    """The trained inverses from the activation back to the image, as one module: (N, *activation) -> (N, C, H, W)
    in pixels of [0, 1] (not yet clipped)."""

    def __init__(self, inverses: nn.ModuleList, mean: torch.Tensor, std: torch.Tensor) -> None:
        super().__init__()
        self.inverses = inverses
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, activation: torch.Tensor) -> torch.Tensor:
        return decode(self.inverses, activation) * self.std + self.mean


def decode(inverses: nn.ModuleList, activation: torch.Tensor) -> torch.Tensor:
    """The inverses chained from the activation back to the image: (B, C, H, W), normalised."""
    x = activation
    for inverse in reversed(inverses):
        x = inverse(x)
    return x


def synthetic_images(
    manifest: Manifest,
    split: str,
    knobs: DivideAndConquerInversion.Knobs,
    *,
    head: nn.Module | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Step 1 alone: the `knobs.synthetic_images` normalised images (n, C, H, W) synthesised from the head's batch
    norms, made once and cached, keyed by the knobs synthesis depends on: runs of the attack that differ only in how
    they train the inverses (their width, epochs, ...) share them, and so does a study of the images themselves
    (attacker.split_extraction)."""
    synthesis = {name: getattr(knobs, name) for name in SYNTHESIS_KNOBS}
    kept = cache_path(DivideAndConquerInversion.name, manifest, split, synthesis).with_suffix(".synthetic.pt")
    if kept.exists():
        return torch.load(kept, weights_only=True)
    if head is None:
        head = to_torch(manifest.split(split).head)
        head.requires_grad_(False)
    torch.manual_seed(knobs.seed)
    n, size = knobs.synthetic_images, knobs.batch_size
    mean = torch.from_numpy(manifest.mean)[:, None, None]
    std = torch.from_numpy(manifest.std)[:, None, None]
    synthetic = torch.cat(
        [
            deep_inversion(head, mean, std, manifest.input_shape, min(size, n - i), knobs.synthesis_steps, progress)
            for i in range(0, n, size)
        ]
    )
    torch.save(synthetic, kept)
    return synthetic


def deep_inversion(
    model: nn.Module,
    mean: torch.Tensor,
    std: torch.Tensor,
    shape: tuple[int, ...],
    n: int,
    steps: int,
    progress: bool,
    *,
    targets: torch.Tensor | None = None,
    statistics: bool = True,
) -> torch.Tensor:
    """DeepInversion: n normalised images (n, C, H, W) descended on to match the batch norms' statistics of `model`
    (the head, here; without `statistics`, none), under a total-variation and an l2 prior; `mean` and `std` (C, 1, 1)
    are the model's input normalisation.

    With `targets` (n,) class indices, `model` is the whole classifier and the images are also descended on to be
    given those classes (cross-entropy on its logits): Yin et al.'s class-conditional synthesis, and, without
    `statistics`, a plain class inversion (Fredrikson et al. 2015) with the same priors."""
    from tqdm import tqdm

    moments: list[torch.Tensor] = []

    def match(module: nn.Module, args: tuple, _output: torch.Tensor) -> None:
        x = args[0]  # (B, C, H, W), what the batch norm normalises
        running_mean, running_var = (
            (module.running_mean, module.running_var)
            if isinstance(module, nn.modules.batchnorm._BatchNorm)
            else args[3:5]
        )
        dims = [0, *range(2, x.dim())]
        weight = FIRST_BN_WEIGHT if not moments else 1.0
        moments.append(
            weight
            * (
                torch.linalg.vector_norm(x.mean(dims) - running_mean)
                + torch.linalg.vector_norm(x.var(dims, unbiased=False) - running_var)
            )
        )

    hooks = [m.register_forward_hook(match) for m in batch_norms_of(model)] if statistics else []
    pixels = torch.rand(n, *shape, requires_grad=True)  # (n, C, H, W) in [0, 1]
    optimizer = torch.optim.Adam([pixels], lr=SYNTHESIS_LR, betas=(0.5, 0.9))
    try:
        for _ in tqdm(range(steps), desc="deep inversion", disable=not progress, leave=False):
            dy, dx = torch.randint(-JITTER, JITTER + 1, (2,)).tolist()
            x = torch.roll(pixels, shifts=(dy, dx), dims=(2, 3))
            if torch.rand(()) < 0.5:
                x = x.flip(3)
            moments.clear()
            output = model((x - mean) / std)
            loss = (
                sum(moments)
                + TV_WEIGHT * total_variation(pixels).mean()
                + L2_WEIGHT * ((pixels - mean) / std).square().mean()
            )
            if targets is not None:
                loss = loss + F.cross_entropy(output, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            with torch.no_grad():
                pixels.clamp_(0.0, 1.0)
    finally:
        for hook in hooks:
            hook.remove()
    return ((pixels.detach() - mean) / std).contiguous()


def batch_norms_of(head: nn.Module) -> list[nn.Module]:
    """The head's batch norms, as torch's own or as onnx2torch converts ONNX's BatchNormalization."""
    return [m for m in head.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm | OnnxBatchNorm)]
