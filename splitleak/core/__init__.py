"""What every role shares and a phone can run: numpy, ONNX Runtime and gRPC, never torch.

The tensor codec (`codec`), gRPC settings (`transport`), the exported model's manifest (`manifest`), the link model
(`link`), the run-time defences (`defences`), data sets (`data`), the capture format both taps write (`capture`),
per-frame records and their summaries (`records`, `metrics`), thresholds and data-set facts (`facts`), and starting
splitleak's own processes (`process`). Nothing here imports a role, a model or the study.
"""
