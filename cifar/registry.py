"""One way to extend every component: a Registry maps a config name to its builder. Models, optimizers and LR
schedules each have one (cifar/models.py MODELS, cifar/optim.py OPTIMIZERS, cifar/schedule.py SCHEDULES); the config
validates its names against them and `train.py --help` lists them. docs/extending.md shows each in a few lines.

    @OPTIMIZERS.register("rmsprop")
    def rmsprop(groups, cfg):
        return torch.optim.RMSprop(groups, lr=cfg.lr, momentum=cfg.momentum)
"""
from __future__ import annotations

from typing import Callable, Iterator

from .errors import UserError


class Registry:
    """Builders by name, in registration order (the order --help lists them). `meta` holds what a kind of component
    says about each entry beside its builder (a schedule's default warmup)."""

    def __init__(self, kind: str, key: str):
        self.kind, self.key = kind, key              # "optimizer", and the config key that names one: optim.name
        self._builders: dict[str, Callable] = {}
        self.meta: dict[str, dict] = {}

    def register(self, name: str, **meta) -> Callable[[Callable], Callable]:
        """Decorator: @REGISTRY.register("name") on a builder (any callable), returned unchanged. A name registered
        twice is a bug in whoever registers it (two plugins fighting over one name), so it is refused."""
        if not name or ":" in name:
            raise ValueError(f"{self.kind} name {name!r}: a name is non-empty and has no ':' (reserved for "
                             f"module:callable)")

        def add(builder: Callable) -> Callable:
            if name in self._builders and self._builders[name] is not builder:
                raise ValueError(f"{self.kind} {name!r} is registered already (by {self._builders[name].__module__})")
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
        if name not in self._builders:
            raise UserError(self.unknown(name))
        return self._builders[name]

    def choices(self) -> str:
        return ", ".join(self._builders)

    def unknown(self, name) -> str:
        """The config's one-line refusal of a name, listing the choices."""
        return f"config key '{self.key}' must be one of {self.choices()}; got {name!r}"
