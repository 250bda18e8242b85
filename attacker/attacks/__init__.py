"""The attacks, by name: each is a class in a file of its own here, and one line in ATTACKS.

Every attack says what it knows in `knowledge` and cites its paper in its module's docstring; see base.py for the
shape they share.
"""

from __future__ import annotations

from splitleak.attacker.attacks.base import Attack
from splitleak.attacker.attacks.datafree import DivideAndConquerInversion
from splitleak.attacker.attacks.decoder import InverseNetwork
from splitleak.attacker.attacks.rmle import RegularizedMLE
from splitleak.attacker.attacks.shadow import ShadowModel

ATTACKS: dict[str, type[Attack]] = {
    "rmle": RegularizedMLE,
    "decoder": InverseNetwork,
    "datafree": DivideAndConquerInversion,
    "shadow": ShadowModel,
}


def build(name: str, **knobs) -> Attack:
    """The attack called `name`, built (and trained, if it trains) with `knobs`."""
    if name not in ATTACKS:
        raise KeyError(f"unknown attack {name!r}; the attacks are {', '.join(ATTACKS)}")
    return ATTACKS[name](**knobs)
