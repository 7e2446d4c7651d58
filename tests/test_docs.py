"""The README's methods table is generated from the method specs and must not drift."""

import re
from pathlib import Path

from merging.cli import methods_markdown

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_methods_table_matches_the_registered_methods():
    text = README.read_text(encoding="utf-8")
    match = re.search(r"<!-- methods-table:.*?-->\n(.*?)\n<!-- /methods-table -->", text, re.S)
    assert match, "README lost its methods-table markers"
    assert match.group(1) == methods_markdown(), "regenerate with: python -m merging methods --markdown"


def test_readme_keeps_the_two_setup_commands():
    text = README.read_text(encoding="utf-8")
    assert "pip install -r requirements.txt && python app.py" in text
    assert "pip install -r requirements-dev.txt && python -m pytest -q" in text
