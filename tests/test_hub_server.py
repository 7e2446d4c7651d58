"""Hub references through the real ``huggingface_hub`` client, against a local Hub server.

``tests/support/hub_server.py`` speaks the Hub's HTTP API (info, tree, resolve with LFS redirects,
Range, auth and gating errors, commits); the ``hub`` fixture points the client at it. Nothing of
the client is patched, so these tests check what ``tests/test_sources.py`` checks with a fake
downloader, end to end: what is fetched, when, and what a refusal says.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from helpers import copy_model, edit_tensors, error_line, family, load_model_tensors, run_cli, write_recipe
from merging.errors import CheckpointError, SourceError
from merging.sources import resolve_model


def _files(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_same_tensors(a, b) -> None:
    ta, tb = load_model_tensors(a), load_model_tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name


# -- downloads -------------------------------------------------------------------------------

def test_hub_id_downloads_exactly_the_files_of_the_published_folder(hub, llama, in_empty_dir):
    hub.publish("org/base", llama.base)
    model = resolve_model("org/base")
    assert _files(model.folder) == _files(llama.base)  # safetensors, config, tokenizer, byte for byte
    assert model.architecture == "LlamaForCausalLM"
    assert hub.sent("org/base", suffix=".safetensors") == (llama.base / "model.safetensors").stat().st_size


def test_cli_merge_of_hub_ids_equals_the_merge_of_the_local_folders(hub, llama, tmp_path):
    for name, folder in (("base", llama.base), ("ft1", llama.finetuned[0]), ("ft2", llama.finetuned[1])):
        hub.publish(f"org/{name}", folder)
    recipe = {"merge_method": "ties", "base_model": "{base}", "parameters": {"density": 0.5},
              "models": [{"model": "{ft1}", "parameters": {"weight": 0.6}},
                         {"model": "{ft2}", "parameters": {"weight": 0.4}}]}

    def recipe_for(refs):
        text = yaml.safe_dump(recipe, sort_keys=False)
        for key, ref in refs.items():
            text = text.replace("{" + key + "}", ref)
        return text

    hub_refs = {"base": "org/base", "ft1": "org/ft1", "ft2": "org/ft2"}
    hub_recipe = write_recipe(tmp_path / "hub.yaml", recipe_for(hub_refs))
    local_recipe = write_recipe(tmp_path / "local.yaml", recipe_for(
        {"base": str(llama.base), "ft1": str(llama.finetuned[0]), "ft2": str(llama.finetuned[1])}))
    from_hub = run_cli("merge", hub_recipe, tmp_path / "from-hub", "--quiet", cwd=tmp_path)
    assert from_hub.returncode == 0, from_hub.stderr
    local = run_cli("merge", local_recipe, tmp_path / "local", "--quiet", cwd=tmp_path)
    assert local.returncode == 0, local.stderr
    _assert_same_tensors(tmp_path / "from-hub", tmp_path / "local")
    assert all(hub.sent(f"org/{name}", suffix=".safetensors") > 0 for name in ("base", "ft1", "ft2"))


# -- refusals before weights -----------------------------------------------------------------

def test_incompatible_hub_pair_is_refused_before_any_safetensors_byte(hub, llama, in_empty_dir, tmp_path):
    from merging.engine import merge
    from merging.recipe import load_recipe

    hub.publish("org/base", llama.base)
    hub.publish("org/other", family("qwen2", 1).finetuned[0])
    recipe = load_recipe("merge_method: ties\nbase_model: org/base\nmodels: [org/other]\n")
    with pytest.raises(CheckpointError, match="architectures differ"):
        merge(recipe, tmp_path / "out", device="cpu")
    assert hub.sent(suffix=".safetensors") == 0
    assert hub.sent("org/other", suffix="config.json") > 0  # the configs were what was read
    assert not (tmp_path / "out").exists()

    result = run_cli("merge", write_recipe(tmp_path / "r.yaml", "merge_method: ties\nbase_model: org/base\n"
                                                                "models: [org/other]\n"),
                     tmp_path / "cli-out", cwd=tmp_path)
    assert "architectures differ" in error_line(result)
    assert hub.sent(suffix=".safetensors") == 0


def test_layout_mismatch_is_refused_after_only_safetensors_headers(hub, llama, in_empty_dir, tmp_path):
    """Same config, one tensor reshaped: the safetensors headers (HTTP Range) show it, so only
    header bytes are sent, never a whole weights file (issue #16 item 2)."""
    from merging.engine import merge
    from merging.recipe import load_recipe

    broken = copy_model(llama.finetuned[0], tmp_path / "broken")
    edit_tensors(broken, lambda state: state.update({
        "model.layers.0.mlp.up_proj.weight": state["model.layers.0.mlp.up_proj.weight"][:-1].clone()}))
    hub.publish("org/base", llama.base)
    hub.publish("org/broken", broken)
    recipe = load_recipe("merge_method: ties\nbase_model: org/base\nmodels: [org/broken]\n")
    with pytest.raises(CheckpointError, match="up_proj"):
        merge(recipe, tmp_path / "out", device="cpu")
    for repo, folder in (("org/base", llama.base), ("org/broken", broken)):
        sent = hub.sent(repo, suffix=".safetensors")
        assert 0 < sent <= 100_001 < (folder / "model.safetensors").stat().st_size, (repo, sent)
    assert not (tmp_path / "out").exists()


# -- private and gated repos -----------------------------------------------------------------

def test_private_repo_needs_the_token(hub, llama, in_empty_dir, tmp_path, monkeypatch):
    hub.publish("org/secret", llama.finetuned[0], private=True)
    result = run_cli("merge", write_recipe(tmp_path / "r.yaml", "merge_method: linear\nmodels:\n"
                                                                "  - {model: org/secret, parameters: {weight: 1}}\n"),
                     tmp_path / "out", cwd=tmp_path)
    message = error_line(result)
    assert message.startswith("org/secret was not found on the Hub, or it is private") and "HF_TOKEN" in message
    assert hub.sent(suffix=".safetensors") == 0

    monkeypatch.setenv("HF_TOKEN", hub.token)
    assert _files(resolve_model("org/secret").folder) == _files(llama.finetuned[0])
    merged = run_cli("merge", tmp_path / "r.yaml", tmp_path / "out", "--quiet", cwd=tmp_path)  # a new process
    assert merged.returncode == 0, merged.stderr
    _assert_same_tensors(tmp_path / "out", llama.finetuned[0])


def test_private_and_missing_repos_look_the_same_without_a_token(hub, llama, in_empty_dir):
    hub.publish("org/secret", llama.finetuned[0], private=True)
    messages = []
    for ref in ("org/secret", "org/missing"):
        with pytest.raises(SourceError) as caught:
            resolve_model(ref)
        messages.append(str(caught.value).replace(ref, "REF"))
    assert messages[0] == messages[1]  # a private repo's existence is not revealed


def test_gated_repo_is_refused_with_the_gated_error(hub, llama, in_empty_dir, tmp_path, monkeypatch):
    hub.publish("org/gated", llama.finetuned[0], gated="manual", grant=False)
    result = run_cli("merge", write_recipe(tmp_path / "r.yaml", "merge_method: linear\nmodels:\n"
                                                                "  - {model: org/gated, parameters: {weight: 1}}\n"),
                     tmp_path / "out", cwd=tmp_path)
    message = error_line(result)
    assert "org/gated" in message and "gated" in message.lower() and "HF_TOKEN" in message
    assert hub.sent(suffix=".safetensors") == 0
    monkeypatch.setenv("HF_TOKEN", hub.token)  # a valid token without access: 403, still the gated refusal
    with pytest.raises(SourceError, match="(?i)gated"):
        resolve_model("org/gated")
    assert [status for _, path, status in hub.requests if "/resolve/" in path][-1] == 403
    hub.publish("org/gated", llama.finetuned[0], gated="manual", grant=True)  # access granted
    assert resolve_model("org/gated").config["model_type"] == "llama"
    assert hub.sent("org/gated", suffix=".safetensors") == (llama.finetuned[0] / "model.safetensors").stat().st_size


# -- revisions -------------------------------------------------------------------------------

def test_pinned_revision_fetches_that_revisions_files(hub, llama, in_empty_dir):
    old = hub.publish("org/model", llama.base, message="first version")
    new = hub.publish("org/model", llama.finetuned[0], message="second version")
    assert old != new
    _assert_same_tensors(resolve_model(f"org/model@{old}").folder, llama.base)
    _assert_same_tensors(resolve_model("org/model").folder, llama.finetuned[0])
    _assert_same_tensors(resolve_model(f"org/model@{new}").folder, llama.finetuned[0])
    hub.add_tag("org/model", "v1.0", old)
    _assert_same_tensors(resolve_model("org/model@v1.0").folder, llama.base)
    hub.publish("org/model", llama.finetuned[1], revision="experiment")
    _assert_same_tensors(resolve_model("org/model@experiment").folder, llama.finetuned[1])
    with pytest.raises(SourceError, match="no-such-branch") as caught:
        resolve_model("org/model@no-such-branch")
    assert "RevisionNotFoundError" in str(caught.value) or "revision" in str(caught.value)


# -- HTTP Range ------------------------------------------------------------------------------

def test_safetensors_metadata_reads_only_the_header_with_http_range(hub, llama):
    import huggingface_hub
    from safetensors import safe_open

    hub.publish("org/base", llama.base)
    metadata = huggingface_hub.get_safetensors_metadata("org/base")
    shapes = {name: tuple(info.shape) for name, info in metadata.files_metadata["model.safetensors"].tensors.items()}
    with safe_open(llama.base / "model.safetensors", "pt") as f:
        assert shapes == {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    size = (llama.base / "model.safetensors").stat().st_size
    sent = hub.sent("org/base", suffix=".safetensors")
    assert sent == min(100_001, size) < size  # the client's first 100 KB read, never the whole file
    assert any(status == 206 for _, _, status in hub.requests)


def test_safetensors_metadata_of_a_sharded_model_reads_each_shard_header(hub):
    import huggingface_hub

    sharded = family("llama", 1, shard_size="20KB")
    shards = sorted(p.name for p in sharded.base.glob("*.safetensors"))
    assert len(shards) > 2
    hub.publish("org/sharded", sharded.base)
    metadata = huggingface_hub.get_safetensors_metadata("org/sharded")  # HEAD model.safetensors: 404 first
    assert metadata.sharded and sorted(metadata.files_metadata) == shards
    assert metadata.weight_map.keys() == load_model_tensors(sharded.base).keys()
    assert not any(path.endswith("/model.safetensors") and status == 200 for _, path, status in hub.requests)


def test_range_requests_follow_http_semantics(hub):
    import httpx

    data = bytes(range(256)) * 4
    hub.publish("org/raw", {"data.bin": data, "notes.txt": b"hello"})
    with httpx.Client(follow_redirects=True) as client:
        url = f"{hub.url}/org/raw/resolve/main/data.bin"
        assert client.get(url, headers={"Range": "bytes=10-19"}).content == data[10:20]
        tail = client.get(url, headers={"Range": "bytes=-5"})
        assert tail.status_code == 206 and tail.content == data[-5:]
        assert tail.headers["Content-Range"] == f"bytes {len(data) - 5}-{len(data) - 1}/{len(data)}"
        assert client.get(url, headers={"Range": f"bytes={len(data)}-"}).status_code == 416
        small = client.get(f"{hub.url}/org/raw/resolve/main/notes.txt", headers={"Range": "bytes=1-"})
        assert small.status_code == 206 and small.content == b"ello"


# -- writes (issue #16 item 4) -----------------------------------------------------------------

def test_upload_folder_commits_what_snapshot_download_then_fetches(hub, llama, tmp_path):
    from huggingface_hub import HfApi, snapshot_download

    api = HfApi(token=hub.token)
    repo = api.create_repo("org/merged", private=True)
    assert repo.repo_id == "org/merged"
    api.create_repo("org/merged", exist_ok=True)
    commit = api.upload_folder(repo_id="org/merged", folder_path=llama.finetuned[1], commit_message="Upload merge")
    assert api.model_info("org/merged").sha == commit.oid
    assert sorted(api.list_repo_files("org/merged")) == sorted(_files(llama.finetuned[1]))
    sizes = {s.rfilename: (s.size, s.lfs.sha256 if s.lfs else None)
             for s in api.model_info("org/merged", files_metadata=True).siblings}
    assert sizes["model.safetensors"][1] is not None and sizes["config.json"][1] is None
    assert any(method == "PUT" for method, _, _ in hub.requests)  # the weights went through the LFS upload
    folder = snapshot_download("org/merged", token=hub.token)
    assert _files(Path(folder)) == _files(llama.finetuned[1])
    with pytest.raises(Exception, match="RepositoryNotFound|Repository Not Found"):
        HfApi(token=False).model_info("org/merged")  # private: not visible without the token


def test_push_to_hub_uploads_a_folder_that_resolves_back(hub, llama, in_empty_dir, monkeypatch):
    from merging.export import push_to_hub

    seen = []
    url = push_to_hub(llama.finetuned[0], "my-merge", private=True, token=hub.token, progress=seen.append)
    assert url == f"{hub.url}/tester/my-merge"  # a short name goes to the token's user (whoami), on this Hub
    assert hub.repos["tester/my-merge"].private
    size = sum(p.stat().st_size for p in llama.finetuned[0].rglob("*") if p.is_file())
    assert seen[-1].finished and seen[-1].upload and seen[-1].done == seen[-1].total == size
    assert seen[-1].describe().startswith("uploaded tester/my-merge:")
    assert len(hub.repos["tester/my-merge"].commits) == 2  # the empty first commit, then one with every file
    monkeypatch.setenv("HF_TOKEN", hub.token)
    assert _files(resolve_model("tester/my-merge").folder) == _files(llama.finetuned[0])


def test_each_hub_refusal_says_what_to_do_for_its_own_case(hub, llama, in_empty_dir):
    """Private or missing, gated, unknown revision: each message names the repository and the fix."""
    hub.publish("org/secret", llama.finetuned[0], private=True)
    hub.publish("org/gated", llama.finetuned[0], gated="manual", grant=False)
    commit = hub.publish("org/open", llama.finetuned[0])
    cases = {
        "org/secret": ["org/secret was not found on the Hub, or it is private", "check the id", "HF_TOKEN"],
        "org/gated": ["org/gated is a gated model", f"{hub.url}/org/gated", "accept its conditions", "HF_TOKEN"],
        "org/open@nope": ["org/open has no revision 'nope'", "branch, tag or commit"],
    }
    for ref, parts in cases.items():
        with pytest.raises(SourceError) as caught:
            resolve_model(ref)
        message = str(caught.value)
        assert all(part in message for part in parts), message
        assert "\n" not in message and "Traceback" not in message
    assert resolve_model(f"org/open@{commit}").config["model_type"] == "llama"


def test_a_model_over_the_hosted_size_limit_is_refused_before_its_weights(hub, llama, in_empty_dir):
    """A hosted studio asks the Hub's file listing for the weights' size: nothing but a few KB
    of metadata is sent before the one-line refusal."""
    from merging.sources import SourcePolicy

    hub.publish("org/big", llama.base)
    size = (llama.base / "model.safetensors").stat().st_size
    hub.reset_counters()
    with pytest.raises(SourceError) as caught:
        resolve_model("org/big", SourcePolicy(max_model_bytes=size // 2))
    message = str(caught.value)
    assert message.startswith("org/big has ") and "this studio accepts models up to" in message and "\n" not in message
    assert hub.sent(suffix=".safetensors") == 0 and hub.sent() < 1_000_000
    assert resolve_model("org/big", SourcePolicy(max_model_bytes=2 * size)).config["model_type"] == "llama"


def test_deploy_creates_a_gradio_space_with_the_app_and_requests_its_hardware(hub, tmp_path):
    """``python -m studio deploy``: the Space holds the app, every package it imports and the
    Space card (Gradio SDK, OAuth) as README.md, and not the tests; a second deploy updates it."""
    import subprocess
    import sys

    from huggingface_hub import HfApi

    from helpers import REPO, _cli_env

    command = [sys.executable, "-m", "studio", "deploy", "tester/merge-studio", "--hardware", "cpu-upgrade", "--private"]
    env = {**_cli_env(), "HF_TOKEN": hub.token}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("tester/merge-studio") and hub.token not in done.stdout + done.stderr
    api = HfApi(token=hub.token)
    files = set(api.list_repo_files("tester/merge-studio", repo_type="space"))
    assert {"app.py", "requirements.txt", "README.md", "merging/engine.py", "studio/ui.py", "tuning/search.py",
            "demo/adapters/geography.safetensors"} <= files
    assert not any(f.startswith(("tests/", "bench/")) or "__pycache__" in f for f in files)
    card = (REPO / "spaces_config" / "README.md").read_text()
    fetched = Path(api.hf_hub_download("tester/merge-studio", "README.md", repo_type="space"))
    assert fetched.read_text() == card and "sdk: gradio" in card and "hf_oauth: true" in card
    assert hub.spaces["spaces/tester/merge-studio"] == {"sdk": "gradio", "hardware": "cpu-upgrade"}

    again = subprocess.run(command[:5], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr  # the Space exists: updated, not refused
    denied = subprocess.run(command[:5], cwd=REPO, env={**env, "HF_TOKEN": "hf_wrong"}, capture_output=True,
                            text=True, timeout=300)
    assert denied.returncode == 1 and denied.stderr.strip().startswith("error: deploying the Space tester/merge-studio")
    assert "hf_wrong" not in denied.stderr and len(denied.stderr.strip().splitlines()) == 1
