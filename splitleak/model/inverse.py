"""The inverse network: a decoder from a split point's activation back to the input image.

The same network serves the attacker (the `decoder` attack of He, Zhang and Lee, ACSAC 2019, trains it on queries to
the head) and the defender (adversarial training in splitleak.model.objectives trains the head against it), so it
lives with the models rather than with either role.

g is sized from the activation's shape and the image's: a 3x3 convolution in, one stride-2 transposed convolution
per doubling of the side (He et al.'s decoders mirror the head's pooling the same way), halving the width each time
so every stage costs about the same, and a 3x3 convolution out to the image's channels. A batch norm on the way in
learns the activation's scale, which differs by orders of magnitude between heads with and without batch norm.
"""

from __future__ import annotations

from torch import nn


def build_decoder(activation_shape: tuple[int, ...], image_shape: tuple[int, int, int], width: int) -> nn.Sequential:
    """A decoder from activations of `activation_shape` ((C, h, w) or (C,)) to images of `image_shape` (H, W, C)."""
    c, h, w = (*activation_shape, 1, 1) if len(activation_shape) == 1 else activation_shape
    height, width_px, channels = image_shape
    layers: list[nn.Module] = [nn.Unflatten(1, (c, 1, 1))] if len(activation_shape) == 1 else []
    layers += [nn.BatchNorm2d(c), nn.Conv2d(c, width, 3, padding=1), nn.ReLU()]
    while 2 * h <= height and 2 * w <= width_px:
        out = max(width // 2, 16)
        layers += [nn.ConvTranspose2d(width, out, 4, stride=2, padding=1), nn.ReLU()]  # (B, out, 2h, 2w)
        width, h, w = out, 2 * h, 2 * w
    if (h, w) != (height, width_px):  # sides that are not a power of two apart (224 from 14 is, 112 from 8 is not)
        layers.append(nn.Upsample(size=(height, width_px), mode="bilinear"))
    layers += [nn.Conv2d(width, channels, 3, padding=1), nn.Sigmoid()]  # (B, C, H, W) in [0, 1]
    return nn.Sequential(*layers)
