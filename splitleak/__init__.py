"""splitleak: how much private input leaks when a phone splits a neural network with the cloud.

The layout is the architecture; imports only run downward (tests/test_layers.py holds them to it):

    splitleak.core, splitleak.protos    what every role shares and a phone can run (numpy, ONNX Runtime, gRPC)
    splitleak.model                     the torch side: zoo, training, export            (imports core)
    splitleak.device, splitleak.cloud   the two halves of a split deployment             (import core)
    splitleak.attacker                  taps and attacks                                 (imports core, model)
    splitleak.study, splitleak.demo     the trade-off sweep and the live demo            (import all of the above)
    splitleak.cli, splitleak.run        the console script                               (on top)

Importing this package imports nothing heavy: the device imports it and must never pull in torch.
"""

__version__ = "0.1.0"
