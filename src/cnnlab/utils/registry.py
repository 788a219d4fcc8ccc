"""A name -> builder registry (timm's pattern): a decorator adds builders under unique names, and
asking for an unknown name fails with the list of known ones. The model zoo, the backbones and the
classifier kinds each keep one, and none of them imports another."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Builders by name; ``what`` names them in messages ("model", "backbone", ...)."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator adding a builder under ``name``; registering a name twice is a ValueError."""

        def deco(fn: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.what} {name!r} is already registered")
            self._items[name] = fn
            return fn

        return deco

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def get(self, name: str, *, also: str = "") -> T:
        """The builder of ``name``, or a ValueError listing the known names (and ``also``: other forms
        a name may take)."""
        if name not in self._items:
            known = ", ".join(self.names()) + (f", or {also}" if also else "")
            raise ValueError(f"unknown {self.what} {name!r}; known {self.what}s: {known}")
        return self._items[name]
