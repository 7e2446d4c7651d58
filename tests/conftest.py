"""Session-wide fixtures: tiny random homologous model families on disk.

Each family is built once per test session under pytest's ``tmp_path_factory`` with
``tests.support.families.build_family`` (real ``save_pretrained`` folders with config, generation
config and tokenizer, which both our engine and mergekit consume). They are small (hidden 64,
2-3 layers, vocabulary 512) so building all of them takes a few seconds.

Families are read-only: tests that need to damage a model copy it first.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # ``merging`` is importable however pytest was started
    sys.path.insert(0, str(REPO))
import demo  # noqa: E402,F401  (registers the demo suite and calibration sources, as the entry points do)

# Calibration statistics computed by tests go to a scratch cache, never the user's (set before
# any CLI subprocess starts, so they inherit it too).
os.environ.setdefault("MERGE_STUDIO_CALIBRATION_CACHE", tempfile.mkdtemp(prefix="merge-studio-calibration-"))
os.environ.setdefault("MERGE_STUDIO_TUNING_CACHE", tempfile.mkdtemp(prefix="merge-studio-tuning-"))  # sources' scores

from helpers import family  # noqa: E402
from tests.support.families import build_family  # noqa: E402
from tests.support.hub_fixture import hub  # noqa: E402,F401  (the local Hub server fixture)

SMALL = dict(hidden_size=64, vocab_size=512)


def _build(tmp_path_factory, name: str, arch: str, n_finetuned: int, **kwargs):
    return build_family(tmp_path_factory.mktemp(name), arch, n_finetuned, **SMALL, **kwargs)


@pytest.fixture(scope="session")
def llama_family(tmp_path_factory):
    """Llama with tied embeddings (no ``lm_head.weight`` stored), 3 layers, 3 fine-tunes.

    Three layers so that a gradient ``[a, b, c]`` gives the middle layer ``b`` and ``[a, b]`` the
    middle layer their mean. ``delta_scale`` 0.05 keeps base and fine-tunes further apart than
    SLERP's collinearity threshold (|cos| > 0.9995), so SLERP really interpolates on the sphere.
    """
    return _build(tmp_path_factory, "llama", "llama", 3, num_layers=3, tie_word_embeddings=True,
                  delta_scale=0.05, seed=11)


@pytest.fixture(scope="session")
def qwen2_family(tmp_path_factory):
    """Qwen2 with untied embeddings (``lm_head.weight`` stored), attention biases and GQA."""
    return _build(tmp_path_factory, "qwen2", "qwen2", 2, num_layers=2, tie_word_embeddings=False,
                  delta_scale=0.1, seed=22)


@pytest.fixture(scope="session")
def gpt2_family(tmp_path_factory):
    """GPT-2 (Conv1D weights stored transposed, learned positions, LayerNorm biases), tied."""
    return _build(tmp_path_factory, "gpt2", "gpt2", 2, num_layers=2, tie_word_embeddings=True, seed=33)


# DARE statistics need big tensors: with intermediate_size 1024 every MLP matrix has 65,536
# entries, so the kept fraction's standard deviation is at most 0.002 (a 1% band is 5 sigma).
DARE_ARGS = dict(num_layers=2, intermediate_size=1024, tie_word_embeddings=True, delta_scale=0.01, seed=44)


@pytest.fixture(scope="session")
def dare_family(tmp_path_factory):
    """Llama, 2 layers, 2 fine-tunes, one ``model.safetensors`` per model."""
    return _build(tmp_path_factory, "dare", "llama", 2, **DARE_ARGS)


@pytest.fixture(scope="session")
def dare_family_sharded(tmp_path_factory):
    """The same models as ``dare_family`` (same seed), saved in 20 KB shards with an index.

    The shards hold the tensors in a different order than the single file, so the engine
    reads (and processes) them in a different order.
    """
    return _build(tmp_path_factory, "dare-sharded", "llama", 2, shard_size="20KB", **DARE_ARGS)


@pytest.fixture(scope="module")
def one_cpu_thread():
    """One torch thread while a module's tests run: they are thousands of small tensor ops, and on
    a CPU that other work keeps busy a second thread makes each of them wait (3-10x slower here)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def llama():
    """A small Llama family (base + 2 fine-tunes), built once for every test that takes it."""
    return family("llama", 2)


@pytest.fixture()
def in_empty_dir(tmp_path, monkeypatch):
    """Run in an empty folder, so that 'org/name' cannot accidentally exist as a local path."""
    monkeypatch.chdir(tmp_path)
    return tmp_path
