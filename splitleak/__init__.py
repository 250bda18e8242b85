"""splitleak: how much private input leaks when a phone splits a neural network with the cloud.

The shared package: models and split points (`zoo`), data (`data`), the tensor codec (`codec`), the link model
(`link`), metrics (`metrics`). The roles live in `splitleak.device`, `splitleak.cloud` and `splitleak.attacker`.
Importing this package imports nothing heavy: the device imports it and must never pull in torch.
"""

__version__ = "0.1.0"
