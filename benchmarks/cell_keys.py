"""Print every experiment config's cell keys, one line per config: diff the output before and after a change to
show that it leaves every stored cell addressable (a refactor that moves a key orphans the results).

    .venv/bin/python benchmarks/cell_keys.py > before.txt   # ... change the code ...
    .venv/bin/python benchmarks/cell_keys.py | diff before.txt -
"""
from __future__ import annotations

from pathlib import Path

from leakbench.evaluation.config import load_config

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    for path in sorted((ROOT / "experiments").rglob("*.yaml")):
        config = load_config(path)
        cells = config.cells()
        print(path.relative_to(ROOT), config.name, len(cells), " ".join(cell.key for cell in cells))


if __name__ == "__main__":
    main()
