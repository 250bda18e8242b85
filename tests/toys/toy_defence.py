"""A defence from outside splitleak, as a user adds one without forking: the device multiplies the activation by a
constant before it leaves. One file, one registry line; name the module in SPLITLEAK_DEFENCES.

numpy only, like the built-in defences, so the device that loads it stays torch-free. It declares no `received`
form: an attacker who models the defence (rMLE) refuses it rather than model it wrongly.
"""

from __future__ import annotations

import numpy as np

from splitleak.core.defences import Defence, Slider, Strengths, register_defence


class Scale(Defence):
    name = "toy-scale"
    strengths = Strengths("the factor the activation is multiplied by", low=0.25, high=4, slider=Slider(0.5, 4, 0.5, 2))

    def apply(self, activation, rng):
        return {"activation": activation * np.float32(self.strength)}, {}


register_defence(Scale)
