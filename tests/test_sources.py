"""Model references: Hub ids through the downloader, the pickle policy, hosted-mode path limits.

There is no Hub access in the tests: ``resolve_model`` takes the download function as an
argument, and a recording fake that returns a local family folder stands in for
``huggingface_hub.snapshot_download``.
"""

from __future__ import annotations

import fnmatch
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import family
from merging.errors import SourceError
from merging.sources import SourcePolicy, resolve_model, split_revision

WANTED = ["model.safetensors", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
          "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
          "special_tokens_map.json", "tokenizer.model", "merges.txt", "vocab.txt"]
UNWANTED = ["modeling_custom.py", "configuration_custom.py", "model.pt", "optimizer.pt",
            "pytorch_model.bin", "pytorch_model-00001-of-00002.bin", "training_args.bin",
            "model.ckpt", "flax_model.msgpack", "tf_model.h5"]
PICKLES = ["pytorch_model.bin", "pytorch_model-00001-of-00002.bin"]


def matches(patterns: list[str], filename: str) -> bool:
    return any(fnmatch.fnmatch(filename, p) for p in patterns)


class FakeHub:
    """Records each download call and answers with a local folder (or raises ``error``)."""

    def __init__(self, folder: Path | None = None, error: Exception | None = None):
        self.folder, self.error, self.calls = folder, error, []

    def __call__(self, repo_id, revision, allow_patterns, token=None):
        self.calls.append((repo_id, revision, list(allow_patterns)))
        if self.error is not None:
            raise self.error
        return str(self.folder)


# -- Hub ids ---------------------------------------------------------------------------------

def test_hub_id_with_revision_goes_through_download(llama, in_empty_dir):
    hub = FakeHub(llama.finetuned[0])
    model = resolve_model("some-org/some-model@v1.2", download=hub)
    assert len(hub.calls) == 1
    repo_id, revision, patterns = hub.calls[0]
    assert (repo_id, revision) == ("some-org/some-model", "v1.2")
    assert model.folder == llama.finetuned[0]
    assert model.ref == "some-org/some-model@v1.2"
    assert model.architecture == "LlamaForCausalLM"
    for name in WANTED:
        assert matches(patterns, name), f"{name} would not be downloaded"
    for name in UNWANTED:
        assert not matches(patterns, name), f"{name} would be downloaded"


def test_hub_id_without_revision(llama, in_empty_dir):
    hub = FakeHub(llama.finetuned[0])
    resolve_model("org/name", download=hub)
    assert hub.calls[0][:2] == ("org/name", None)
    assert split_revision("org/name@main") == ("org/name", "main")
    assert split_revision("org/name") == ("org/name", None)


def test_allow_pickle_adds_pickle_weights_only(llama, in_empty_dir):
    hub = FakeHub(llama.finetuned[0])
    resolve_model("org/name", SourcePolicy(allow_pickle=True), download=hub)
    patterns = hub.calls[0][2]
    for name in WANTED + PICKLES:
        assert matches(patterns, name), name
    for name in set(UNWANTED) - set(PICKLES):
        assert not matches(patterns, name), f"{name} would be downloaded"


def test_download_failure_becomes_source_error(in_empty_dir):
    hub = FakeHub(error=RuntimeError("401 Client Error: Unauthorized for url\nmore detail"))
    with pytest.raises(SourceError) as caught:
        resolve_model("private-org/gated-model@main", download=hub)
    message = str(caught.value)
    assert "private-org/gated-model@main" in message
    assert "HF_TOKEN" in message
    assert "401" in message and "more detail" not in message  # first line of the cause only
    assert "\n" not in message


def test_downloaded_repo_with_only_pickles_is_refused(llama, tmp_path, in_empty_dir):
    pickled = shutil.copytree(llama.finetuned[0], tmp_path / "snapshot")
    torch.save(load_file(pickled / "model.safetensors"), pickled / "pytorch_model.bin")
    (pickled / "model.safetensors").unlink()
    with pytest.raises(SourceError, match="--allow-pickle"):
        resolve_model("org/pickled", download=FakeHub(pickled))
    assert resolve_model("org/pickled", SourcePolicy(allow_pickle=True), download=FakeHub(pickled)).folder == pickled


def test_plain_unknown_name_is_not_found(in_empty_dir):
    hub = FakeHub(error=AssertionError("must not download"))
    with pytest.raises(SourceError, match="not found") as caught:
        resolve_model("nonexistent_model_xyz", download=hub)
    assert "nonexistent_model_xyz" in str(caught.value)
    assert hub.calls == []


def test_local_folder_is_used_without_download(llama):
    hub = FakeHub(error=AssertionError("must not download"))
    model = resolve_model(str(llama.base), download=hub)
    assert model.folder == llama.base and hub.calls == []
    assert model.config["model_type"] == "llama"


def test_local_file_is_not_a_model(llama):
    with pytest.raises(SourceError, match="folder"):
        resolve_model(str(llama.base / "config.json"))


# -- hosted mode -----------------------------------------------------------------------------

@pytest.fixture()
def hosted(tmp_path, llama):
    """An allowed root holding one model, and a model outside it."""
    root = tmp_path / "allowed"
    inside = shutil.copytree(llama.finetuned[0], root / "models" / "ft1")
    outside = shutil.copytree(llama.finetuned[1], tmp_path / "private" / "ft2")
    return SourcePolicy(hosted=True, allowed_roots=(root,)), root, inside, outside


def _refused(ref: str, policy: SourcePolicy) -> str:
    hub = FakeHub(error=AssertionError("must not download"))
    with pytest.raises(SourceError) as caught:
        resolve_model(ref, policy, download=hub)
    assert hub.calls == []
    return str(caught.value)


def test_hosted_refuses_system_paths(hosted):
    policy = hosted[0]
    for ref in ("/etc", "/etc/passwd", "/", "~", "/nonexistent/elsewhere"):
        assert "disabled" in _refused(ref, policy), ref


def test_hosted_refuses_traversal_out_of_the_root(hosted):
    policy, root, _, outside = hosted
    escaping = f"{root}/models/../../private/ft2"
    assert Path(escaping).resolve() == outside.resolve()  # it does exist, and is a model
    assert "disabled" in _refused(escaping, policy)
    assert "disabled" in _refused(f"{root}/../private/ft2", policy)


def test_hosted_refuses_symlink_pointing_outside(hosted):
    policy, root, _, outside = hosted
    link = root / "models" / "innocent"
    link.symlink_to(outside, target_is_directory=True)
    assert "disabled" in _refused(str(link), policy)


def test_hosted_refuses_relative_paths_resolving_outside(hosted, tmp_path, monkeypatch):
    policy = hosted[0]
    monkeypatch.chdir(tmp_path)
    assert "disabled" in _refused("./private/ft2", policy)


def test_hosted_accepts_folders_under_the_root(hosted):
    policy, root, inside, _ = hosted
    hub = FakeHub(error=AssertionError("must not download"))
    assert resolve_model(str(inside), policy, download=hub).folder == inside
    # A symlink inside the root to another folder inside the root is fine too.
    (root / "alias").symlink_to(inside, target_is_directory=True)
    assert resolve_model(str(root / "alias"), policy, download=hub).config["model_type"] == "llama"
    assert hub.calls == []


def test_hosted_still_downloads_hub_ids(hosted, llama, in_empty_dir):
    policy = hosted[0]
    hub = FakeHub(llama.finetuned[0])
    assert resolve_model("org/name@rev", policy, download=hub).folder == llama.finetuned[0]
    assert hub.calls[0][:2] == ("org/name", "rev")
    assert not matches(hub.calls[0][2], "pytorch_model.bin")


def test_incompatible_hub_models_fail_before_any_weights_are_downloaded(llama, in_empty_dir, tmp_path):
    """Configs are fetched first, so a mismatch is reported after kilobytes, not gigabytes."""
    from merging.engine import merge
    from merging.errors import CheckpointError
    from merging.recipe import load_recipe

    qwen = family("qwen2", 1)
    folders = {"org/base": llama.base, "org/other": qwen.finetuned[0]}
    calls = []

    def download(repo_id, revision, allow_patterns, token=None):
        calls.append((repo_id, list(allow_patterns)))
        return str(folders[repo_id])

    def resolver(ref, policy, weights=True):
        return resolve_model(ref, policy, download=download, weights=weights)

    recipe = load_recipe("merge_method: ties\nbase_model: org/base\nmodels: [org/other]\n")
    with pytest.raises(CheckpointError, match="architectures differ"):
        merge(recipe, tmp_path / "out", resolver=resolver)
    assert calls and all(patterns == ["*.json"] for _, patterns in calls)
    assert not (tmp_path / "out").exists()


def test_existing_output_is_refused_before_any_download(llama, in_empty_dir, tmp_path):
    from merging.engine import merge
    from merging.errors import CheckpointError
    from merging.recipe import load_recipe

    hub = FakeHub(llama.base)
    (tmp_path / "out").mkdir()
    recipe = load_recipe("merge_method: ties\nbase_model: org/base\nmodels: [org/ft]\n")
    with pytest.raises(CheckpointError, match="already exists"):
        merge(recipe, tmp_path / "out", resolver=lambda ref, policy, **kw: resolve_model(ref, policy, download=hub, **kw))
    assert hub.calls == []
