"""The package layers, enforced on the source (import-linter's contracts, as a test): each package imports only
the layers beneath it, at any depth (inside functions and TYPE_CHECKING blocks too), and always through the one
namespace (``leakbench.splitnn``, never a bare ``splitnn``, which would load a second copy of every module)."""
import ast

import pytest

from harness import ROOT

PACKAGES = ("contracts", "splitnn", "defenses", "attacks", "evaluation")
#: What each package may import of ours.
ALLOWED = {
    "contracts": set(),
    "splitnn": {"contracts"},
    "defenses": {"contracts", "splitnn"},
    "attacks": {"contracts", "splitnn", "defenses"},
    "evaluation": {"contracts", "splitnn", "defenses", "attacks"},
}
#: The one place attacks read defenses: the readers that tell defense-aware PEEL what a defense released.
DEFENSE_READERS = {"attacks/peel/readers.py"}


def _package(module: str, names: list[str]) -> set[str]:
    """The packages of ours that importing ``names`` from ``module`` (or ``module`` itself) reaches; a bare
    ``splitnn`` shows as ``bare splitnn``."""
    parts = module.split(".")
    if parts[0] in PACKAGES:
        return {f"bare {parts[0]}"}
    if parts[0] != "leakbench":
        return set()
    return {parts[1]} if len(parts) > 1 else set(names) & set(PACKAGES)


def _ours(source: str) -> set[str]:
    """The packages of ours a source imports."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found |= _package(alias.name, [])
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= _package(node.module, [alias.name for alias in node.names])
    return found


def violations(package: str, files: dict[str, str]) -> dict[str, set[str]]:
    """file -> the packages it imports against the layers."""
    found = {}
    for name, source in files.items():
        bad = _ours(source) - ALLOWED[package] - {package}
        if package == "attacks" and name not in DEFENSE_READERS and "defenses" in _ours(source):
            bad.add("defenses")
        if bad:
            found[name] = bad
    return found


def _sources(package: str) -> dict[str, str]:
    return {path.relative_to(ROOT).as_posix(): path.read_text() for path in (ROOT / package).rglob("*.py")}


@pytest.mark.parametrize("package", PACKAGES)
def test_each_package_imports_only_the_layers_beneath_it(package):
    assert violations(package, _sources(package)) == {}


@pytest.mark.parametrize("package, injected, caught", [
    ("contracts", "import leakbench.splitnn", {"splitnn"}),
    ("splitnn", "def build():\n    from leakbench.defenses import get", {"defenses"}),
    ("splitnn", "def build():\n    from leakbench import defenses", {"defenses"}),
    ("defenses", "if TYPE_CHECKING:\n    from leakbench.attacks.base import Attack", {"attacks"}),
    ("attacks", "from leakbench.defenses.noise import GaussianNoise", {"defenses"}),  # outside the readers
    ("attacks", "import leakbench.evaluation.runner", {"evaluation"}),
    ("defenses", "from splitnn import train", {"bare splitnn"}),  # around the namespace: a second copy
])
def test_an_injected_upward_import_is_caught(package, injected, caught):
    files = _sources(package)
    name = sorted(n for n in files if n not in DEFENSE_READERS)[0]
    files[name] += "\n\n" + injected + "\n"
    assert violations(package, files) == {name: caught}


@pytest.mark.parametrize("folder", ["leakbench", "tests", "benchmarks"])
def test_the_tests_and_benchmarks_import_through_the_namespace_too(folder):
    bare = {name: {p for p in _ours(source) if p.startswith("bare ")} for name, source in _sources(folder).items()}
    assert {name: found for name, found in bare.items() if found} == {}
