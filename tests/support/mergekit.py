"""mergekit 0.1.5 as the reference: run it on recipes, and compare its output with ours tensor by tensor.

mergekit runs as a real subprocess on the same float32 model folders as our engine. Its start-up
(importing torch, transformers, pydantic ...) costs ~5 s, so a test module runs all its cases in
one ``mergekit-multi`` process (a multi-document YAML; each document goes through mergekit's own
``run_merge``, exactly as ``mergekit-yaml`` does).

Tolerance: per tensor, max |ours - theirs| / max |theirs| <= 1e-5.

One documented exception: magnitude trimming (TIES, Breadcrumbs) at a tie. When several entries
of a task vector have exactly the magnitude at the keep threshold, both keep exactly k entries,
but mergekit's ``argsort`` picks an arbitrary subset of the tied ones and we pick the earliest.
With ``Case.trims``, differences are accepted only at entries whose |delta| value is duplicated
within that model's task vector, and only a few per tensor; everything else must match to 1e-5.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from tests.support.families import load_tensors

MERGEKIT_YAML = shutil.which("mergekit-yaml")
MERGEKIT_MULTI = shutil.which("mergekit-multi")
TOLERANCE = 1e-5
MERGEKIT_TIMEOUT = 300


@dataclass(frozen=True)
class Case:
    recipe: dict
    base: Path | None  # origin of the task vectors, for explaining trim ties
    finetuned: tuple[Path, ...] = ()
    trims: bool = False  # magnitude-based sparsification (ties can differ, see module docstring)


def model_entry(path: Path, **parameters) -> dict:
    """A recipe's ``models`` entry: ``{model: path, parameters: {...}}``."""
    entry: dict = {"model": str(path)}
    if parameters:
        entry["parameters"] = parameters
    return entry


def run_mergekit_multi(recipes: dict[str, dict], root: Path, *extra: str) -> dict[str, Path]:
    """Merge every recipe with one ``mergekit-multi`` process; returns name -> output folder.

    mergekit-multi treats any string equal to a document name as a reference to that merge (even
    ``merge_method: ties``), so document names get a prefix no method has.
    """
    root.mkdir(parents=True, exist_ok=True)
    docs = [{"name": f"case-{name}", **recipe} for name, recipe in recipes.items()]
    multi = root / "multi.yaml"
    multi.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    finish(subprocess.Popen([MERGEKIT_MULTI, str(multi), "--intermediate-dir", str(root / "multi"), "--no-lazy", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=root), "mergekit-multi")
    return {name: root / "multi" / f"case-{name}" for name in recipes}


def start_mergekit_yaml(recipe: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([MERGEKIT_YAML, str(recipe), str(out), *extra], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=recipe.parent)


def finish(process: subprocess.Popen, name: str) -> None:
    output, _ = process.communicate(timeout=MERGEKIT_TIMEOUT)
    assert process.returncode == 0, f"{name} failed (exit {process.returncode}):\n{output[-4000:]}"


def duplicated_magnitudes(delta: torch.Tensor) -> torch.Tensor:
    """Entries whose |delta| value occurs more than once in the tensor (where top-k is ambiguous)."""
    magnitude = delta.abs().reshape(-1)
    _, inverse, counts = torch.unique(magnitude, return_inverse=True, return_counts=True)
    return (counts[inverse] > 1).reshape(delta.shape)


def compare(case: Case, ours: dict, theirs: dict) -> list[str]:
    """Assert parity tensor by tensor; return notes on differences explained by trim ties."""
    assert sorted(ours) == sorted(theirs), (
        f"tensor names differ: only ours {sorted(set(ours) - set(theirs))}, "
        f"only mergekit {sorted(set(theirs) - set(ours))}"
    )
    inputs = None
    notes = []
    for name in sorted(theirs):
        a, b = ours[name], theirs[name]
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype} (ours) vs {b.dtype} (mergekit)"
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} (ours) vs {tuple(b.shape)} (mergekit)"
        scale = b.abs().max().clamp_min(1e-30)
        diff = (a.float() - b.float()).abs()
        worst = (diff.max() / scale).item()
        if worst <= TOLERANCE:
            continue
        off = diff > TOLERANCE * scale
        explained = torch.zeros_like(off)
        if case.trims:
            if inputs is None:
                inputs = [load_tensors(case.base)] + [load_tensors(p) for p in case.finetuned]
            base = inputs[0][name]
            for model in inputs[1:]:
                explained |= duplicated_magnitudes(model[name] - base)
        unexplained = off & ~explained
        count = int(off.sum())
        assert not unexplained.any() and count <= 2 * max(1, len(case.finetuned)), (
            f"{name}: max relative difference {worst:.3e} > {TOLERANCE:g} at {count} of {off.numel()} "
            f"entries ({int(unexplained.sum())} not at a magnitude tie); first at flat index "
            f"{int(off.reshape(-1).nonzero()[0])}: ours {a.reshape(-1)[off.reshape(-1)][0].item():.8g}, "
            f"mergekit {b.reshape(-1)[off.reshape(-1)][0].item():.8g}"
        )
        notes.append(f"{name}: {count} entr{'y' if count == 1 else 'ies'} at a magnitude tie differ "
                     f"(max relative difference {worst:.2e})")
    return notes
