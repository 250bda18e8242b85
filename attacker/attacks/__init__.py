"""The attacks, by name: each is a class in a file of its own here, and one line in ATTACKS.

Every attack declares what it knows in `knowledge`, what it is given (`needs_auxiliary`, `needs_labels`, `adaptive`)
and its `Knobs`, and cites its paper in its module's docstring; see base.py for the shape they share. An attack from
outside the repository is a module of its own with its class and one line, `register_attack(TheAttack)`, named in
SPLITLEAK_ATTACKS (splitleak.core.plugins).
"""

from __future__ import annotations

from splitleak.attacker.attacks.base import Attack
from splitleak.attacker.attacks.datafree import DivideAndConquerInversion
from splitleak.attacker.attacks.decoder import InverseNetwork
from splitleak.attacker.attacks.rmle import RegularizedMLE
from splitleak.attacker.attacks.shadow import ShadowModel
from splitleak.core.plugins import Registry

ATTACKS: Registry[type[Attack]] = Registry(
    "attack",
    Attack,
    {"name": str, "knowledge": str},
    (RegularizedMLE, InverseNetwork, DivideAndConquerInversion, ShadowModel),
    variable="SPLITLEAK_ATTACKS",
)
register_attack = ATTACKS.register


def build(name: str, **given) -> Attack:
    """The attack called `name`, built (and trained, if it trains) with what it is `given`: knowledge and knobs."""
    if name not in ATTACKS:
        raise KeyError(f"unknown attack {name!r}; the attacks are {', '.join(ATTACKS)}")
    return ATTACKS[name](**given)
