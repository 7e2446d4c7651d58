"""Hub downloads people can watch, stop and run again (issue #16 item 3), through the real
``huggingface_hub`` client against the local Hub server (``tests/support/hub_server.py``), which
can send slowly (``hub.rate``) and drop connections (``hub.cuts``)."""

from __future__ import annotations

import os
import threading

import pytest
from helpers import error_line, run_cli, write_recipe
from huggingface_hub.constants import DOWNLOAD_CHUNK_SIZE

from merging.errors import SourceError
from merging.hub import DownloadCancelled, DownloadProgress, watching
from merging.sources import SourcePolicy, resolve_model

MB = 1_000_000
SMALL, LARGE = 1 * MB, 24 * MB  # the large shard spans several of huggingface_hub's 10 MB chunks


def _publish_sharded(hub, repo: str = "org/sharded") -> dict[str, bytes]:
    """A repo shaped like a sharded checkpoint (the tests only download it: the bytes are random)."""
    files = {"config.json": b'{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}',
             "model-00001-of-00002.safetensors": os.urandom(SMALL),
             "model-00002-of-00002.safetensors": os.urandom(LARGE)}
    hub.publish(repo, files)
    return files


def test_a_download_reports_bytes_of_the_total_and_its_rate(hub, in_empty_dir):
    _publish_sharded(hub)
    hub.rate = 40 * MB  # about 0.6 s, so several reports arrive
    seen: list[DownloadProgress] = []
    with watching(seen.append, every_s=0.05):
        model = resolve_model("org/sharded")
    assert (model.folder / "model-00002-of-00002.safetensors").stat().st_size == LARGE
    total = SMALL + LARGE + len(b'{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}')
    assert all(state.total == total and state.repo == "org/sharded" for state in seen)
    assert [state.done for state in seen] == sorted(state.done for state in seen) and len(seen) >= 3
    last = seen[-1]
    assert last.finished and last.done == total and last.fraction == 1.0
    assert 5 * MB < last.rate < 200 * MB  # bytes per second, near the server's 40 MB/s
    first = seen[0].describe()  # the first report may come from the small config file: bytes/s, not MB/s
    assert first.startswith("downloading org/sharded: ") and " of 25.0 MB at " in first and first.endswith("B/s")


def test_stop_keeps_the_finished_files_and_running_again_fetches_only_the_rest(hub, in_empty_dir):
    files = _publish_sharded(hub)
    hub.rate = 20 * MB
    stop = threading.Event()

    def stop_midway(state: DownloadProgress) -> None:
        if state.done >= 10 * MB:  # the small shard is in, the large one halfway
            stop.set()

    with watching(stop_midway, stop, every_s=0.0), pytest.raises(DownloadCancelled, match="files already fetched are kept"):
        resolve_model("org/sharded")
    assert 0 < hub.sent("org/sharded", suffix="00002-of-00002.safetensors") < LARGE
    hub.rate, before = None, hub.sent("org/sharded", suffix="00001-of-00002.safetensors")
    assert before == SMALL
    model = resolve_model("org/sharded")
    assert hub.sent("org/sharded", suffix="00001-of-00002.safetensors") == SMALL  # the finished shard: not again
    assert (model.folder / "model-00002-of-00002.safetensors").read_bytes() == files["model-00002-of-00002.safetensors"]


def test_stop_before_the_download_starts_fetches_nothing(hub, in_empty_dir):
    _publish_sharded(hub)
    stop = threading.Event()
    stop.set()
    with watching(cancel=stop), pytest.raises(DownloadCancelled):
        resolve_model("org/sharded")
    assert hub.sent("org/sharded") == 0


def test_a_dropped_connection_resumes_from_its_last_byte(hub, in_empty_dir):
    files = _publish_sharded(hub)
    hub.cuts = {"model-00002-of-00002.safetensors": [15 * MB]}
    model = resolve_model("org/sharded")
    assert (model.folder / "model-00002-of-00002.safetensors").read_bytes() == files["model-00002-of-00002.safetensors"]
    # resumed with a Range after the last whole chunk it wrote (10 MiB): only the bytes after it came twice
    assert hub.sent("org/sharded", suffix="00002-of-00002.safetensors") == LARGE + 15 * MB - DOWNLOAD_CHUNK_SIZE
    assert any(status == 206 for _, path, status in hub.requests if "blobs" in path)


def test_a_download_cut_for_good_says_run_it_again_and_then_completes(hub, in_empty_dir):
    _publish_sharded(hub)
    hub.cuts = {"model-00002-of-00002.safetensors": [15 * MB] * 8}  # every retry dies where the last one did
    with pytest.raises(SourceError, match="was cut .*run it again"):
        resolve_model("org/sharded")
    hub.cuts = {}
    model = resolve_model("org/sharded")
    assert (model.folder / "model-00002-of-00002.safetensors").stat().st_size == LARGE
    assert hub.sent("org/sharded", suffix="00001-of-00002.safetensors") == SMALL  # kept from the first run


def test_the_cli_prints_download_progress(hub, llama, tmp_path):
    hub.publish("org/base", llama.base)
    hub.publish("org/tuned", llama.finetuned[0])
    size = (llama.base / "model.safetensors").stat().st_size
    hub.rate = size / 1.5  # each model's weights take a second or two
    recipe = write_recipe(tmp_path / "r.yaml", "merge_method: task_arithmetic\nbase_model: org/base\n"
                                              "models:\n  - {model: org/tuned, parameters: {weight: 1.0}}\n")
    result = run_cli("merge", recipe, tmp_path / "out", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert any(line.startswith("downloading org/base:") and " of " in line and "B/s" in line for line in lines), lines
    assert any(line.startswith("downloaded org/tuned:") for line in lines), result.stderr


# -- whose token -------------------------------------------------------------------------------

def test_a_private_model_is_read_with_the_policys_token_and_refused_anonymously(hub, llama, in_empty_dir, monkeypatch):
    visitor = hub.add_user("visitor")
    hub.publish("org/private", llama.finetuned[0], private=True, grant=False, readers=(visitor,))
    monkeypatch.setenv("HF_TOKEN", hub.token)  # the server's own token, which cannot read it either
    hosted = SourcePolicy(hosted=True, hub_token=False)
    with pytest.raises(SourceError, match="private: check the id; for a private model, sign in"):
        resolve_model("org/private", hosted)
    assert hub.token not in hub.tokens_seen  # anonymous means anonymous: the server's token was never sent
    assert resolve_model("org/private", SourcePolicy(hosted=True, hub_token=visitor)).config["model_type"] == "llama"
    assert visitor not in repr(SourcePolicy(hub_token=visitor))


def test_what_one_visitors_token_fetched_is_not_served_to_another_from_the_cache(hub, llama, in_empty_dir):
    """The download cache is shared, and huggingface_hub serves a cached snapshot when the Hub
    refuses the listing (a gated repo's listing is even public): the Hub is asked first."""
    from merging.model_card import recipe_of
    from merging.model_info import describe

    visitor = hub.add_user("visitor")
    hub.publish("org/private", llama.finetuned[0], private=True, grant=False, readers=(visitor,))
    hub.publish("org/gated", llama.finetuned[1], gated="manual", grant=False, readers=(visitor,))
    signed_in, anonymous = SourcePolicy(hosted=True, hub_token=visitor), SourcePolicy(hosted=True, hub_token=False)
    for repo in ("org/private", "org/gated"):
        assert resolve_model(repo, signed_in).config["model_type"] == "llama"  # weights now in the shared cache
        with pytest.raises(SourceError, match="private|gated"):
            resolve_model(repo, anonymous)
        with pytest.raises(SourceError, match="private|gated"):
            resolve_model(repo, anonymous, weights=False)
        assert describe(repo, anonymous).error and not describe(repo, anonymous).tensors
    with pytest.raises(SourceError, match="private"):
        recipe_of("org/private", anonymous)


def test_a_gated_model_tells_the_cli_user_to_accept_its_conditions(hub, llama, tmp_path):
    hub.publish("org/gated", llama.finetuned[0], gated="manual", grant=False)
    recipe = write_recipe(tmp_path / "r.yaml", "merge_method: linear\nmodels:\n  - {model: org/gated, parameters: {weight: 1}}\n")
    message = error_line(run_cli("merge", recipe, tmp_path / "out", cwd=tmp_path), allow_progress=True)
    assert message.startswith("org/gated is a gated model: accept its conditions on its page")
