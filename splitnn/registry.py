"""A name -> factory registry; zoo, datasets, defenses and attacks each keep one."""
from __future__ import annotations

from typing import Any, Callable, Generic, TypeVar

from leakbench.splitnn.errors import ParameterError

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to factories so configs can name things; unknown names fail with the list of known ones."""

    def __init__(self, what: str):
        self.what = what
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorate(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.what} {name!r} is registered twice")
            self._factories[name] = factory
            return factory
        return decorate

    def register_class(self, name: str) -> Callable[[type], type]:
        """Class decorator: register ``cls`` under ``name`` and set ``cls.name`` to it."""
        def decorate(cls: type) -> type:
            setattr(cls, "name", name)
            self.register(name)(cls)
            return cls
        return decorate

    def factory(self, name: str) -> Callable[..., T]:
        if name not in self._factories:
            raise ParameterError("name", name, f"a known {self.what}: " + ", ".join(sorted(self._factories)))
        return self._factories[name]

    def get(self, name: str, **params: Any) -> T:
        """Build the thing registered as ``name`` with ``params``."""
        factory = self.factory(name)
        try:
            return factory(**params)
        except TypeError as exc:  # unknown keyword: say which, in config terms
            import inspect
            sig = inspect.signature(factory)
            known = [p for p in sig.parameters if p not in ("self", "args", "kwargs")]
            for key in params:
                if key not in sig.parameters and not any(
                        p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
                    raise ParameterError(key, params[key],
                                         f"no such parameter of {self.what} {name!r}; known: {', '.join(known)}"
                                         ) from exc
            raise

    def unregister(self, name: str) -> None:
        """Forget ``name`` (a plug-in registered for a while, e.g. by a test); unknown names are ignored."""
        self._factories.pop(name, None)

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, name: object) -> bool:
        return name in self._factories
