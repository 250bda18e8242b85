"""Thresholds and data-set facts that more than one module judges by, each defined once."""

from __future__ import annotations

# He, Zhang and Lee (ACSAC 2019) found that below this SSIM a person no longer recognises a reconstruction: a frame
# whose reconstruction reaches it counts as recognisable, and a configuration whose attacks stay below it as safe.
RECOGNISABLE_SSIM = 0.3

# Data sets whose labels name people: their reconstructions are also scored for identity leakage.
IDENTITY_DATASETS = ("att_faces",)
