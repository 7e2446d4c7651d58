"""The Guide: the argument for merging, as runnable cells on the demo family.

    from guide import CELLS, Notebook
    notebook = Notebook()                 # results cached under $MERGE_STUDIO_CACHE/guide
    output = notebook.run("ties")         # computed once, then read from the cache
    notebook.export("tour.html")          # every cell with its output, one self-contained page

Each cell (``guide.story``) is a short explanation with its formula and a computation that
returns figures, tables and text (``guide.cells.Output``). Results are cached on disk by the
cell's inputs (``guide.cache``): the family's adapters, the cell's recipe and the code's version,
so a second visitor sees every output at once and a cell re-runs only when its inputs change.
Used by the studio's Guide tab and by ``notebooks/tour.ipynb``.
"""

from guide.cells import Cell, Output
from guide.notebook import Notebook
from guide.story import CELLS

__all__ = ["CELLS", "Cell", "Notebook", "Output"]
