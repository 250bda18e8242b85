"""The model zoo: every model is an ordered chain of named blocks, and a split point is the name of a block.

The head is every block up to and including the split point; the tail is the rest. Keeping each model as an
`nn.Sequential` of named blocks makes head and tail plain slices, so a split can never drop or reorder a layer.

- `resnet20`: the CIFAR ResNet-20 of He, Zhang, Ren and Sun, "Deep residual learning" (CVPR 2016), Section 4.2.
- `hecnn`: the 6-conv + 2-FC CIFAR-10 network of He, Zhang and Lee, "Model inversion attacks against collaborative
  inference" (ACSAC 2019), Table 1, with its split points `conv11`, `relu22` and `relu32`.
- `mobilenet_v2`, `resnet18`: torchvision's architectures, regrouped into blocks; torchvision's ImageNet weights are
  loaded only when they are already in torch's hub cache (never downloaded here).

Every model is built with batch norm, or with `norm="group"` with group norm in its place (Wu and He, "Group
normalization", ECCV 2018): DP-SGD needs it, because batch norm mixes the examples of a batch, so an example's gradient
is no longer its own to clip (splitleak.model.private).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


@dataclass(frozen=True)
class ZooEntry:
    build: Callable[..., nn.Sequential]
    split_points: tuple[str, ...]
    default_split: str
    input_size: int  # the side of the square input it was designed for


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity (or 1x1-projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            # Option B of the paper (projection): exports to plain ONNX ops, unlike option A's zero padding.
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


def resnet20(num_classes: int = 10, in_channels: int = 3) -> nn.Sequential:
    def stage(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1), BasicBlock(cout, cout, 1))

    model = nn.Sequential(
        OrderedDict(
            stem=nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()),
            layer1=stage(16, 16, 1),  # (B, 16, 32, 32)
            layer2=stage(16, 32, 2),  # (B, 32, 16, 16)
            layer3=stage(32, 64, 2),  # (B, 64, 8, 8)
            pool=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten()),
            fc=nn.Linear(64, num_classes),
        )
    )
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return model


def hecnn(num_classes: int = 10, in_channels: int = 3) -> nn.Sequential:
    """He et al. 2019, Table 1 (CIFAR-10): every conv and ReLU is its own block, so each is a split point."""
    layers: list[tuple[str, nn.Module]] = []
    cin = in_channels
    for stage, width in ((1, 64), (2, 128), (3, 128)):
        for i in (1, 2):
            layers.append((f"conv{stage}{i}", nn.Conv2d(cin, width, 3, padding=1)))
            layers.append((f"relu{stage}{i}", nn.ReLU()))
            cin = width
        layers.append((f"pool{stage}", nn.MaxPool2d(2)))
    layers += [
        ("flatten", nn.Flatten()),
        ("fc1", nn.Sequential(nn.Linear(128 * 4 * 4, 512), nn.ReLU())),
        ("fc2", nn.Linear(512, num_classes)),
    ]
    return nn.Sequential(OrderedDict(layers))


def _cached_torchvision_weights(weights) -> dict | None:
    """torchvision's state dict for `weights` if it is already in torch's hub cache, else None (no download)."""
    path = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
    return torch.load(path, map_location="cpu", weights_only=True) if path.exists() else None


def resnet18(num_classes: int = 1000, in_channels: int = 3, pretrained: bool = False) -> nn.Sequential:
    from torchvision.models import ResNet18_Weights
    from torchvision.models import resnet18 as tv_resnet18

    m = tv_resnet18(num_classes=num_classes)
    if pretrained:
        _load_pretrained(m, ResNet18_Weights.IMAGENET1K_V1)
    if in_channels != 3:
        m.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return nn.Sequential(
        OrderedDict(
            stem=nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool),
            layer1=m.layer1,
            layer2=m.layer2,
            layer3=m.layer3,
            layer4=m.layer4,
            pool=nn.Sequential(m.avgpool, nn.Flatten()),
            fc=m.fc,
        )
    )


def mobilenet_v2(num_classes: int = 1000, in_channels: int = 3, pretrained: bool = False) -> nn.Sequential:
    from torchvision.models import MobileNet_V2_Weights
    from torchvision.models import mobilenet_v2 as tv_mobilenet_v2

    m = tv_mobilenet_v2(num_classes=num_classes)
    if pretrained:
        _load_pretrained(m, MobileNet_V2_Weights.IMAGENET1K_V1)
    if in_channels != 3:
        m.features[0][0] = nn.Conv2d(in_channels, 32, 3, 2, 1, bias=False)
    blocks: list[tuple[str, nn.Module]] = [(f"features{i}", f) for i, f in enumerate(m.features)]
    blocks += [("pool", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())), ("classifier", m.classifier)]
    return nn.Sequential(OrderedDict(blocks))


def _load_pretrained(model: nn.Module, weights) -> None:
    state = _cached_torchvision_weights(weights)
    if state is None:
        cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(weights.url).name
        raise FileNotFoundError(
            f"pretrained weights not found at {cache}; splitleak never downloads them: "
            f"fetch {weights.url} there yourself"
        )
    model.load_state_dict(state)


ZOO: dict[str, ZooEntry] = {
    "resnet20": ZooEntry(resnet20, ("stem", "layer1", "layer2", "layer3"), "layer1", 32),
    "hecnn": ZooEntry(hecnn, ("conv11", "relu22", "relu32"), "relu22", 32),
    "mobilenet_v2": ZooEntry(mobilenet_v2, ("features1", "features3", "features6", "features13"), "features3", 224),
    "resnet18": ZooEntry(resnet18, ("stem", "layer1", "layer2", "layer3"), "layer1", 224),
}


NORMS = ("batch", "group")
# Channels are normalised in groups of at most 16 (so ResNet-20's 16, 32 and 64 channels take groups of 1, 2 and 4),
# the setting De et al. use for DP-SGD on CIFAR-10 ("Unlocking high-accuracy differentially private image
# classification through scale", 2022).
GROUPS = 16


def group_norm(model: nn.Module) -> nn.Module:
    """`model` with every 2-d batch norm replaced, in place, by a group norm of as many channels (fresh weights)."""
    for name, child in model.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(model, name, nn.GroupNorm(min(GROUPS, child.num_features), child.num_features))
        else:
            group_norm(child)
    return model


def build(name: str, norm: str = "batch", **kwargs) -> nn.Sequential:
    """The zoo's model `name`, with batch norm or (`norm="group"`) group norm."""
    if name not in ZOO:
        raise KeyError(f"unknown model {name!r}; the zoo has {', '.join(ZOO)}")
    if norm not in NORMS:
        raise ValueError(f"unknown normalisation {norm!r}: {' or '.join(NORMS)}")
    model = ZOO[name].build(**kwargs)
    return group_norm(model) if norm == "group" else model


def split(model: nn.Sequential, split_point: str) -> tuple[nn.Sequential, nn.Sequential]:
    """(head, tail): the blocks up to and including `split_point`, and the rest. They share the model's weights."""
    names = [name for name, _ in model.named_children()]
    if split_point not in names:
        raise KeyError(f"{split_point!r} is not a block of this model; blocks: {', '.join(names)}")
    cut = names.index(split_point) + 1
    return model[:cut], model[cut:]
