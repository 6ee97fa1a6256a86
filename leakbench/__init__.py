"""leakbench: how much a split residual network leaks its client's input, and how much defenses buy back.

One namespace: ``leakbench.contracts``, ``leakbench.splitnn``, ``leakbench.defenses``, ``leakbench.attacks`` and
``leakbench.evaluation``. In the repository these are the top-level folders of the same names; a wheel maps them
under ``leakbench/`` (pyproject's ``package_dir``).
"""
from pathlib import Path

__version__ = "0.1.0"

# In a source checkout (an editable install, or PYTHONPATH=checkout) the subpackages are this folder's siblings:
# searching the checkout for them keeps every ``leakbench.X`` in the same checkout as this file.
_checkout = Path(__file__).resolve().parent.parent
if (_checkout / "pyproject.toml").is_file() and (_checkout / "splitnn" / "__init__.py").is_file():
    __path__.append(str(_checkout))  # noqa: F821  (a package's __path__)
