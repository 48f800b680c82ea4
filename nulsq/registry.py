"""A name -> object registry, one per pluggable kind (models, datasets, quantizers, optimizers).

The registered name is the config key a user types, so `grep -r '"preresnet20"'` finds the code.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from nulsq.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps config names to builders; unknown names fail with the list of valid ones."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: `@MODELS.register("resnet18")` above a builder function or class."""

        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._items[name] = obj
            return obj

        return add

    def unregister(self, name: str) -> T:
        """Remove and return an entry (for plugins and tests that register something temporary)."""
        return self._items.pop(name)

    def get(self, name: str) -> T:
        if name not in self._items:
            raise UserError(
                f"unknown {self.kind} '{name}'; valid names: {', '.join(sorted(self._items))}"
            )
        return self._items[name]

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items
