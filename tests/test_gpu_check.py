"""bench/gpu_check.sh runs on a GPU machine without a package registry, rarely and once: its every
step is run here on tiny CPU models (``--tiny``) so that it has not rotted when a GPU comes."""

from __future__ import annotations

import json
import subprocess

import pytest

from helpers import REPO

pytest.importorskip("mergekit")  # requirements-dev.txt: the check compares against it


def test_the_gpu_check_runs_every_merge_step_and_prints_its_table(tmp_path):
    result = subprocess.run(["bash", "bench/gpu_check.sh", "--tiny", "--skip-chat", "--workdir", str(tmp_path),
                             "--json", str(tmp_path / "report.json")], cwd=REPO, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    table = result.stdout
    for row in ("| merge ties |", "| merge tsv |", "| read+write floor |"):  # --tiny: one of each kind
        assert row in table, table
    report = json.loads((tmp_path / "report.json").read_text())
    ties = next(r for r in report["merges"]["results"] if r["method"] == "ties")
    assert ties["ours"]["wall_s"] > 0 and ties["mergekit"]["wall_s"] > 0 and report["merges"]["floor"]["wall_s"] > 0
