"""One registry per kind of choice (advantage estimators, reward functions, generation backends).

A registry maps a name to an object plus optional metadata (e.g. whether an advantage estimator needs
a critic). It refuses duplicate names and lists the valid names when asked for an unknown one, so a
config typo gets one clear error instead of a KeyError deep in a run.
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        """Decorator: `@REGISTRY.register("name", needs_critic=True)`."""

        def add(obj: T) -> T:
            self.add(name, obj, **meta)
            return obj

        return add

    def add(self, name: str, obj: T, **meta: Any) -> None:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered; pick another name")
        self._items[name] = obj
        self._meta[name] = dict(meta)

    def get(self, name: str) -> T:
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; valid names: {', '.join(sorted(self._items))}")
        return self._items[name]

    def meta(self, name: str) -> dict[str, Any]:
        self.get(name)
        return self._meta[name]

    def resolve(self, spec: str, error: type[Exception], form: str = "module:name") -> T:
        """A registered name, or `package.module:name` importable from the working directory (a user's own);
        anything else raises `error` naming the spec and the registered names."""
        if spec in self._items:
            return self._items[spec]
        if ":" not in spec:
            raise error(f"{self.kind} {spec!r} is not registered ({', '.join(self.names())}) and is not of the "
                        f"form {form}")
        return import_attribute(spec, self.kind, error)

    def names(self) -> list[str]:
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))


def import_attribute(spec: str, kind: str, error: type[Exception]) -> Any:
    """The object `package.module:name` names, imported from the working directory (a user's reward function,
    environment, ...). Any failure raises `error` with one line naming `kind`, the spec and the fix."""
    module_name, _, attr = spec.partition(":")
    if os.getcwd() not in sys.path:   # a console script's path holds its bin folder, not the working directory
        sys.path.append(os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # an import can fail in many ways; all mean "fix your module"
        raise error(f"{kind} {spec!r}: cannot import module {module_name!r} ({type(err).__name__}: {err}); make it "
                    "importable from the working directory or PYTHONPATH") from None
    obj = getattr(module, attr, None)
    if not callable(obj):
        raise error(f"{kind} {spec!r}: module {module_name!r} has no callable {attr!r}")
    return obj
