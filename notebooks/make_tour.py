"""Writes tour.ipynb from the Guide's cells (their titles and texts), so the two tell one story:

    python notebooks/make_tour.py
"""

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell as code, new_markdown_cell as md, new_notebook

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from guide.story import CELLS  # noqa: E402

cells = [
    md("# Why merging works: a guided tour on a real model\n\n"
       "The same story as the studio's **Guide** tab, through Merge Studio's Python API: a base chat model "
       "(SmolLM2-135M-Instruct) and three experts fine-tuned on facts it cannot know, merged by one method after "
       "another. Every number is a real merge and a real evaluation. Run it from the repository root's `notebooks/` "
       "folder. Each step is one of the Guide's cells (`guide.story`: read its code for the API calls); results are "
       "cached on disk (`$MERGE_STUDIO_CACHE/guide`) and shared with the Guide, so a model is never merged twice "
       "and a step already run shows at once. The first run takes about 5 minutes on 2 CPU cores."),
    code("import json\nimport os\nimport sys\nimport tempfile\nfrom pathlib import Path\n\n"
         "sys.path.insert(0, str(Path.cwd().parent))  # the repository root: its packages are the API\n\n"
         "import pandas as pd\nfrom IPython.display import Markdown, display\n\n"
         "import demo\nfrom evaluation import evaluate\nfrom guide import Notebook, story\n"
         "from guide.runs import Context\n"
         "from merging.engine import merge\nfrom merging.recipe import load_recipe\n\n"
         "family = demo.ensure_family()  # builds the base and the experts on first use\n"
         "context = Context(family, device='cpu')  # merges and evaluates; results cached by recipe\n"
         "notebook = Notebook(device='cpu')  # the Guide's cells: computed once, then read from the same cache\n\n\n"
         "def show(output):\n"
         "    \"\"\"A cell's result: its summary, figures and tables.\"\"\"\n"
         "    display(Markdown(output.summary))\n"
         "    for figure in output.figures:\n"
         "        figure.show()\n"
         "    for title, rows in output.tables:\n"
         "        display(Markdown(f'**{title}**'), pd.DataFrame(rows))\n"
         "family"),
]
runs = {"family": "run_family", "deltas": "run_deltas", "averaging": "run_averaging",
        "task_arithmetic": "run_task_arithmetic", "regmean": "run_regmean", "ties": "run_ties", "table": "run_table",
        "newest": "run_newest"}
for cell in CELLS:
    cells.append(md(f"## {cell.title}\n\n{cell.text}"))
    if cell.key == "averaging":
        cells.append(md("Under the hood, a merge is a recipe (mergekit's YAML, as a dict) and an evaluation: the "
                        "same numbers as the Guide's, computed here without its cache."))
        cells.append(code("recipe = story.AVERAGE.document(family)\nprint(json.dumps(recipe, indent=1)[:400], '...')\n"
                          "with tempfile.TemporaryDirectory() as tmp:  # a merge of this model is 0.5 GB\n"
                          "    merged = merge(load_recipe(recipe), Path(tmp) / 'average', device='cpu')\n"
                          "    report = evaluate(merged.output, 'zoo', device='cpu', general=True)\n"
                          "guide_says = context.measure('average', story.AVERAGE)\n"
                          "assert report.tasks == guide_says['tasks'] and report.general == guide_says['general']\n"
                          "report.summary()"))
    if cell.key == "ties":
        cells.append(md("The three steps on a small block of real task vectors, as numbers (`story.ties_steps`, "
                        "float64):"))
        cells.append(code("from merging.checkpoint import CheckpointReader\n\n"
                          "readers = [CheckpointReader(family[name]) for name in ('base', *demo.EXPERTS)]\n"
                          "base, *experts = [r.get(story.SLICE_TENSOR)[:4, :4].double() for r in readers]\n"
                          "for reader in readers:\n    reader.close()\n"
                          "steps = story.ties_steps([e - base for e in experts], story.TIES_DENSITY)\n"
                          "print('elected sign:\\n', steps['sign'])\nprint('merged δ:\\n', steps['merged'])"))
    cells.append(code(f"{cell.key}_output = notebook.run({cell.key!r})  # story.{runs[cell.key]}(context), cached\n"
                      f"show({cell.key}_output)"))
cells.append(md("## The numbers\n\nThe in-domain and out-of-distribution table as JSON (the test that executes this "
                "notebook compares it, and the average merged by hand above, with the Guide's)."))
cells.append(code("numbers = {row['model']: row for row in table_output.tables[0][1]}\n"
                  "by_hand = {name: round(100 * accuracy, 1) for name, accuracy in report.tasks.items()}\n"
                  "if os.environ.get('MERGE_STUDIO_TOUR_NUMBERS'):\n"
                  "    Path(os.environ['MERGE_STUDIO_TOUR_NUMBERS']).write_text(\n"
                  "        json.dumps({'table': numbers, 'average_by_hand': by_hand}))\n"
                  "pd.DataFrame(numbers.values())"))
notebook = new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                                              "language": "python"},
                                               "language_info": {"name": "python"}})
nbformat.write(notebook, Path(__file__).resolve().parent / "tour.ipynb")
print(f"wrote {len(cells)} cells to notebooks/tour.ipynb")
