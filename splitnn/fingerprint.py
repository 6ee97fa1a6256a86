"""Code fingerprints: a short hash of the package versions and of the project source an artefact depends on,
so that a stored row, checkpoint or cache made by other code is never taken for current.

A module's dependencies are found statically (``ast``): its imports of the project's packages, followed
transitively. An import that names a package counts its ``__init__.py`` text but not the ``__init__``'s own
imports (the registries import every plug-in, which would make every artefact depend on every file); a name
imported from a package is followed to the module the ``__init__`` takes it from.

A module outside the project may be named too (the user's model factory): its own file counts, found where it is
loaded or, without importing it, by ``importlib.util.find_spec``; its imports are not followed.
"""
from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import importlib.util
import json
import sys
from functools import lru_cache
from pathlib import Path
from typing import Iterable

#: The distributions whose installed versions enter every fingerprint (an absent one counts as absent).
PACKAGES = ("torch", "torchvision", "torchmetrics", "scikit-image", "piq", "opacus", "captum", "numpy", "scipy")
#: The project's packages (folders under ROOT): imports of these are followed; anything else is covered by the
#: versions.
PROJECT = ("contracts", "splitnn", "defenses", "attacks", "evaluation")
#: The namespace they import under: ``leakbench.attacks.rmle`` is ``ROOT/attacks/rmle.py``.
NAMESPACE = "leakbench"
#: The directory that holds the project's packages.
ROOT = Path(__file__).resolve().parent.parent


def code_fingerprint(*modules: str) -> str:
    """The fingerprint of the installed package versions and the source of ``modules`` (dotted names, e.g.
    ``"leakbench.attacks.rmle"``) with their project-internal imports; cached per process (``clear_cache``)."""
    return _cached(ROOT, tuple(sorted(set(modules))))


def class_fingerprint(cls: type) -> str:
    """The fingerprint of the module that defines ``cls`` (and what it imports)."""
    return code_fingerprint(cls.__module__)


def clear_cache() -> None:
    """Forget the fingerprints and versions computed so far (after an edit in a running process)."""
    _cached.cache_clear()
    installed_versions.cache_clear()


@lru_cache(maxsize=None)
def _cached(root: Path, modules: tuple[str, ...]) -> str:
    return fingerprint(modules, root=root)


@lru_cache(maxsize=None)
def installed_versions(packages: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """The installed version of each distribution, None for those not installed."""
    found: dict[str, str | None] = {}
    for name in packages:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def fingerprint(modules: Iterable[str], *, root: Path = ROOT, packages: Iterable[str] = PROJECT,
                versions: dict[str, str | None] | None = None) -> str:
    """Uncached ``code_fingerprint`` over the project rooted at ``root`` with the given ``packages`` and
    ``versions`` (default: the installed ones). Paths do not enter the hash, so a copy hashes the same."""
    blob = json.dumps({"versions": installed_versions() if versions is None else versions,
                       "sources": sources(modules, Path(root), tuple(packages))}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def sources(modules: Iterable[str], root: Path, packages: tuple[str, ...] = PROJECT) -> dict[str, str | None]:
    """Module name -> source text of ``modules`` and everything they depend on (None: not found)."""
    return _Walk(root, packages).run(modules)


class _Walk:
    """One dependency walk: ``texts`` holds every file counted, ``followed`` the modules whose imports count."""

    def __init__(self, root: Path, packages: tuple[str, ...]):
        self.root, self.packages = root, packages
        self.texts: dict[str, str | None] = {}
        self.trees: dict[str, ast.Module] = {}
        self.followed: set[str] = set()
        self.is_package: dict[str, bool] = {}

    def run(self, modules: Iterable[str]) -> dict[str, str | None]:
        for name in modules:
            self._parents(name)
            self._read(name)
            self._follow(name)  # an explicitly named module counts with its imports, even a package
        return dict(sorted(self.texts.items()))

    # -- files ------------------------------------------------------------------------------------------
    @staticmethod
    def _folders(name: str) -> list[str]:
        """The folders of module ``name`` under the root: the namespace's subpackages are its top-level folders."""
        parts = name.split(".")
        return parts[1:] if parts[0] == NAMESPACE and len(parts) > 1 else parts

    def _locate(self, name: str) -> tuple[Path, bool] | None:
        """The file of module ``name`` and whether it is a package; outside the project, the loaded module's
        file (e.g. a plug-in defined in a test) or, when it is not loaded, the file the import system would load
        (``find_spec``: a module is not run, though a dotted name's parents are imported)."""
        if self._project(name):
            base = self.root.joinpath(*self._folders(name))
            if (base / "__init__.py").is_file():
                return base / "__init__.py", True
            if base.with_suffix(".py").is_file():
                return base.with_suffix(".py"), False
            return None
        loaded = sys.modules.get(name)
        if loaded is not None:
            path = getattr(loaded, "__file__", None)
            return (Path(path), hasattr(loaded, "__path__")) if path and Path(path).is_file() else None
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):  # a parent that is missing or fails to import, an empty name
            return None
        path = spec.origin if spec is not None and spec.has_location else None
        return (Path(path), spec.submodule_search_locations is not None) \
            if spec is not None and path and Path(path).is_file() else None

    def _read(self, name: str) -> None:
        if name in self.texts:
            return
        found = self._locate(name)
        text = found[0].read_text() if found else None
        self.texts[name] = text
        self.is_package[name] = bool(found and found[1])
        if found and text is not None:
            self.trees[name] = ast.parse(text, filename=str(found[0]))

    def _parents(self, name: str) -> None:
        """Importing ``a.b.c`` runs ``a`` and ``a.b``: their ``__init__`` texts count."""
        parts = name.split(".")
        for i in range(1, len(parts)):
            self._read(".".join(parts[:i]))

    def _project(self, name: str) -> bool:
        return name == NAMESPACE or self._folders(name)[0] in self.packages

    # -- imports --------------------------------------------------------------------------------------
    def _reference(self, name: str) -> None:
        """An import of module ``name``: a module is followed, a package counts by its ``__init__`` text."""
        if not self._project(name):
            return
        self._parents(name)
        self._read(name)
        if not self.is_package[name]:
            self._follow(name)

    def _follow(self, name: str) -> None:
        if name in self.followed or name not in self.trees:
            return
        self.followed.add(name)
        for node in ast.walk(self.trees[name]):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    self._reference(alias.name)
            elif isinstance(node, ast.ImportFrom):
                self._import_from(self._absolute(name, node), [a.name for a in node.names])

    def _absolute(self, name: str, node: ast.ImportFrom) -> str:
        """The module a (possibly relative) ``from ... import`` in module ``name`` names."""
        if not node.level:
            return node.module or ""
        package = name.split(".") if self.is_package.get(name) else name.split(".")[:-1]
        base = package[:len(package) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def _import_from(self, module: str, names: list[str]) -> None:
        if not self._project(module):
            return
        self._reference(module)
        if not self.is_package.get(module):
            return
        for name in names:  # from a package: a submodule, or a name its __init__ takes from a module
            if name == "*":
                self._follow(module)
            elif self._locate(f"{module}.{name}") is not None:
                self._reference(f"{module}.{name}")
            else:
                self._through_init(module, name)

    def _through_init(self, package: str, name: str) -> None:
        """Follow the import by which ``package``'s ``__init__`` binds ``name`` (nothing when it defines it)."""
        for node in ast.walk(self.trees.get(package, ast.Module(body=[], type_ignores=[]))):
            if isinstance(node, ast.ImportFrom):
                for alias in node.names:
                    if (alias.asname or alias.name) == name:
                        self._import_from(self._absolute(package, node), [alias.name])
                        return
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if (alias.asname or alias.name.split(".")[0]) == name:
                        self._reference(alias.name if alias.asname else alias.name.split(".")[0])
                        return
