"""Print how each numbered notebook reads, in numbers: code cells and lines, the largest code
cell besides the parameters cell, the parameters cell's lines, markdown cells and the parameters cell's knobs (``run_notebooks.notebook_shape``).

    .venv/bin/python scripts/notebook_shape.py
"""

from shortlab.run_notebooks import notebook_shape, numbered_notebooks


def main() -> None:
    columns = ("code_cells", "code_lines", "largest_cell", "parameters_lines", "markdown_cells", "knobs")
    print(f"{'notebook':40s} " + " ".join(f"{c:>14s}" for c in columns))
    for path in numbered_notebooks():
        shape = notebook_shape(path)
        print(f"{path.name:40s} " + " ".join(f"{shape[c]:14d}" for c in columns))


if __name__ == "__main__":
    main()
