"""Write what a run leaves behind: the Markdown table and the reconstruction grid."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from evaluation.figures import reconstruction_grid
from evaluation.store import ResultStore
from evaluation.tables import to_markdown

if TYPE_CHECKING:
    from evaluation.runner import Matrix


def write_outputs(store: ResultStore, matrix: "Matrix", out: Path) -> dict[str, str]:
    """``table.md`` and ``reconstructions.png`` for the cells of ``matrix``'s config."""
    cells = matrix.cells()
    frame = store.cells([c.key for c in cells])
    text = to_markdown(frame)
    (out / "table.md").write_text(f"# {matrix.config.name}\n\n{text}\n")
    paths = {"table_text": text, "store": str(store.path), "table": str(out / "table.md")}
    rows = []
    for cell in cells:
        images = store.reconstruction(cell.key)
        if images is not None:
            rows.append((cell.short_label(), images))
    if rows:
        n = cells[0]["evaluation"]["num_images"]
        originals = matrix.dataset(cells[0]).x_test[:n]
        paths["grid"] = str(reconstruction_grid(originals, rows, out / "reconstructions.png"))
    return paths
