"""One way to extend every component: a Registry maps a config name to its builder. Models, optimizers and LR
schedules each have one (cifar/models.py MODELS, cifar/optim.py OPTIMIZERS, cifar/schedule.py SCHEDULES), and so
do data augmentation policies (cifar/augment.py POLICIES); the config validates its names against them and
`train.py --help` lists them. Two ways in, for every registry (docs/extending.md):

- in this project's code: @OPTIMIZERS.register("rmsprop") on the builder;
- from your own code, nothing edited here: optim.name=my_module:my_builder, any callable that Python's import system
  finds from the working directory or PYTHONPATH, called as the registry's own builders are.
"""
from __future__ import annotations

import importlib
import os
import re
import sys
from typing import Callable, Iterator

from .errors import SHOWN, UserError, shorten

USER = "<module>:<callable>"    # the name of one's own builder, as --help and the errors write it
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def spelled(name) -> str:
    """A name as the user typed it, in a message; a huge or unprintable one cut and quoted (errors.shorten)."""
    return name if isinstance(name, str) and len(name) <= SHOWN and name.isprintable() else shorten(name)


class Registry:
    """Builders by name, in registration order (the order --help lists them). `meta` holds what a kind of component
    says about each entry beside its builder (a schedule's default warmup)."""

    def __init__(self, kind: str, key: str, forms: tuple[str, ...] = ()):
        """kind: what an entry is (optimizer); key: the config key that names one (optim.name); forms: the other
        names the key takes that its module resolves before asking the registry (models' torchvision:<name>)."""
        self.kind, self.key, self.forms = kind, key, forms
        self._builders: dict[str, Callable] = {}
        self.meta: dict[str, dict] = {}

    def register(self, name: str, **meta) -> Callable[[Callable], Callable]:
        """Decorator: @REGISTRY.register("name") on a builder, returned unchanged. A name registered twice with two
        builders is a bug in whoever registers them (two plugins fighting over a name): refused."""
        if not name or ":" in name:
            raise ValueError(f"{self.kind} name {name!r}: a registered name is non-empty and has no ':' (that is "
                             f"for {USER})")

        def add(builder: Callable) -> Callable:
            if self._builders.get(name, builder) is not builder:
                raise ValueError(f"{self.kind} {name!r} is registered already, by {self._builders[name].__module__}")
            self._builders[name], self.meta[name] = builder, meta
            return builder
        return add

    def __contains__(self, name: object) -> bool:
        return name in self._builders

    def __iter__(self) -> Iterator[str]:
        return iter(self._builders)

    def __len__(self) -> int:
        return len(self._builders)

    def __getitem__(self, name: str) -> Callable:
        """The builder a name stands for: a registered one, or the user's <module>:<callable>."""
        if name in self._builders:
            return self._builders[name]
        if ":" in name:
            return self.user_builder(name)
        raise UserError(self.unknown(name))

    def check(self, name: str) -> None:
        """Refuse, in one line, a name that stands for no builder (config validation, before any work starts)."""
        self[name]

    def names(self) -> list[str]:
        """What the config key takes, as --help lists it."""
        return [*self._builders, *self.forms, USER]

    def unknown(self, name) -> str:
        """The config's one-line refusal of a name, listing the choices."""
        return f"config key '{self.key}' must be one of {', '.join(self.names())}; got {shorten(name)}"

    def user_builder(self, name: str) -> Callable:
        """<module>:<callable> (the callable may be dotted: module:Class.build), imported the way Python imports:
        from the Python path, which gets the working directory (`python path/to/train.py` puts only the script's
        folder on it): a user's file beside where they run. Their own code, by their explicit choice."""
        module_name, _, attr = name.rpartition(":")
        if not (_DOTTED.fullmatch(module_name) and _DOTTED.fullmatch(attr)):
            raise UserError(self.unknown(name))
        said = f"{self.key}={spelled(name)}"
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.append(os.getcwd())
        try:
            target = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is None or not (module_name + ".").startswith(e.name + "."):
                raise             # the user's module is there and something it imports is not: its traceback says
            raise UserError(f"{said}: no module {module_name} on the Python path (the working directory "
                            f"{os.getcwd()} or PYTHONPATH); run where {module_name.replace('.', '/')}.py is, or add "
                            f"its folder to PYTHONPATH") from None
        for part in attr.split("."):
            if not hasattr(target, part):
                raise UserError(f"{said}: {module_name} ({getattr(target, '__file__', None) or 'a namespace'}) has no "
                                f"attribute {attr}; name a function or class defined in it")
            target = getattr(target, part)
        if not callable(target):
            raise UserError(f"{said}: {module_name}.{attr} is not callable (its type is {type(target).__name__}); "
                            f"name a function or class that builds the {self.kind}")
        return target
