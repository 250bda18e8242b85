"""The registries attacks and defences are picked from by name, and the plugin modules that add to them.

A user adds an attack or a defence without forking: a module of their own defines the class and registers it with one
line (`register_attack(TheAttack)`, `register_defence(TheDefence)`), and an environment variable names the module:
SPLITLEAK_ATTACKS for attacks, SPLITLEAK_DEFENCES for defences, each a comma-separated list of importable modules
(on sys.path: PYTHONPATH). A registry imports its modules when it is first read, not when splitleak is imported, and
each registry only its own: the device reads only the defences, so an attack's module (which imports torch, through
splitleak.attacker.attacks) never reaches it. The processes that the sweep, the demo and `splitleak run` start inherit
the environment, so a plugin defence works in the device they start as well.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T", bound=type)
_imported: set[str] = set()  # by name, so that a module named later in the process is still imported


def load(variable: str) -> None:
    """Import each module that the environment `variable` names and this process has not imported yet."""
    for name in (n.strip() for n in os.environ.get(variable, "").split(",")):
        if not name or name in _imported:
            continue
        _imported.add(name)  # first, so that a plugin reading a registry while it is imported does not recurse
        try:
            importlib.import_module(name)
        except ImportError as e:
            _imported.discard(name)  # so that the next read says so again, rather than going on without it
            raise ImportError(f"{variable} names {name!r}, which cannot be imported: {e}") from e


class Registry(Mapping[str, T], Generic[T]):
    """Classes by their `name`: the built-in ones, and what the plugin modules that `variable` names register.

    `declared`: the class attributes each must declare and their types, the contract that the rest reads."""

    def __init__(self, kind: str, base: T, declared: Mapping[str, type], classes: Iterable[T], *, variable: str):
        self.kind, self.base, self.declared, self.variable = kind, base, declared, variable
        self._classes: dict[str, T] = {}
        for cls in classes:
            self.register(cls)

    def register(self, cls: T) -> T:
        """Add `cls` under its name; returns it, so that it serves as a class decorator too."""
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise TypeError(f"a {self.kind} is a subclass of {self.base.__name__}, not {cls!r}")
        for attribute, kind in self.declared.items():
            if not isinstance(getattr(cls, attribute, None), kind):
                raise TypeError(f"{cls.__name__} must declare `{attribute}`, a {kind.__name__}")
        taken = self._classes.get(cls.name)
        if taken is not None and taken is not cls:
            raise ValueError(f"there is a {self.kind} called {cls.name!r} already: {taken.__module__}.{taken.__name__}")
        self._classes[cls.name] = cls
        return cls

    def __getitem__(self, name: str) -> T:
        load(self.variable)
        return self._classes[name]

    def __iter__(self) -> Iterator[str]:
        load(self.variable)
        return iter(list(self._classes))

    def __len__(self) -> int:
        load(self.variable)
        return len(self._classes)
