"""The chat model pool on tiny real models: sharing, budget, LRU eviction, leases, refusals."""

import gc
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch

from chat.pool import ModelPool, estimate_bytes, format_bytes
from helpers import copy_model, edit_tensors
from merging.errors import MergeStudioError, SourceError
from merging.sources import SourcePolicy


@pytest.fixture(scope="module")
def models(llama_family):
    """Four same-sized models (base + 3 fine-tunes) as references, and the bytes each takes."""
    refs = [str(p) for p in [llama_family.base, *llama_family.finetuned]]
    return refs, ModelPool("1GB", "cpu").estimate(refs[0])


def test_concurrent_gets_load_one_shared_copy(models):
    refs, size = models
    pool = ModelPool(3 * size, "cpu")
    start, handles = threading.Barrier(8), []

    def user():
        start.wait()
        handles.append(pool.get(refs[0]))

    threads = [threading.Thread(target=user) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert pool.loads == 1
    assert len({id(h.model) for h in handles}) == 1
    assert pool.used_bytes == handles[0].nbytes
    assert pool.loaded()[0].leases == 8
    for handle in handles:
        handle.release()
    assert pool.loaded()[0].leases == 0


def test_the_estimate_from_headers_is_the_loaded_size(models):
    refs, size = models
    with ModelPool(3 * size, "cpu").get(refs[0]) as handle:
        # Only non-persistent buffers (the rotary table, a few hundred bytes) are not in the file.
        assert size <= handle.nbytes <= size * 1.01
    assert estimate_bytes(handle.folder, torch.bfloat16) == size // 2  # what a GPU would hold


def test_least_recently_used_is_evicted_and_freed_within_budget(models):
    refs, size = models
    a, b, c = refs[:3]
    pool = ModelPool(int(2.5 * size), "cpu")
    with pool.get(a):
        pass
    with pool.get(b) as handle_b:
        b_model = weakref.ref(handle_b.model)
    with pool.get(a):  # a is now more recent than b
        pass
    with pool.get(c):
        assert pool.used_bytes <= pool.budget_bytes
    assert [m.ref for m in pool.loaded()] == [a, c]
    assert pool.loads == 3
    gc.collect()
    assert b_model() is None, "the evicted model is still alive somewhere"


def test_a_model_in_use_is_never_evicted(models):
    refs, size = models
    pool = ModelPool(int(1.5 * size), "cpu")
    held = pool.get(refs[0])
    with pytest.raises(MergeStudioError, match="in use") as error:
        pool.get(refs[1])
    assert refs[0] in str(error.value) and format_bytes(pool.budget_bytes) in str(error.value)
    assert [m.ref for m in pool.loaded()] == [refs[0]] and held.model is not None
    held.release()


def test_get_waits_for_a_lease_to_be_released(models):
    refs, size = models
    pool = ModelPool(int(1.5 * size), "cpu", wait_s=10)
    held = pool.get(refs[0])
    threading.Timer(0.2, held.release).start()
    started = time.monotonic()
    with pool.get(refs[1]):
        assert time.monotonic() - started >= 0.15
        assert [m.ref for m in pool.loaded()] == [refs[1]]


def test_a_model_over_the_budget_is_refused_before_loading_with_the_numbers(models):
    refs, size = models
    pool = ModelPool(size // 2, "cpu")
    with pytest.raises(MergeStudioError, match="can never be loaded") as error:
        pool.get(refs[0])
    message = str(error.value)
    assert format_bytes(size) in message and format_bytes(size // 2) in message and "float32" in message
    assert pool.loads == 0 and pool.used_bytes == 0


def test_panels_that_cannot_fit_together_are_refused_up_front(models):
    refs, size = models
    pool = ModelPool(int(2.5 * size), "cpu")
    with pytest.raises(MergeStudioError, match="3 models need"):
        pool.get_many(refs[:3])
    assert pool.loads == 0
    handles = pool.get_many([refs[0], refs[1], refs[0]])  # the same model twice is loaded once
    assert pool.loads == 2 and handles[0].model is handles[2].model
    for handle in handles:
        handle.release()


def test_a_rewritten_model_folder_is_loaded_afresh(models, tmp_path):
    refs, size = models
    folder = copy_model(Path(refs[0]), tmp_path / "merged")
    pool = ModelPool(3 * size, "cpu")
    old = pool.get(str(folder))
    old_weight = old.model.model.embed_tokens.weight[0, 0].item()
    edit_tensors(folder, lambda state: state["model.embed_tokens.weight"].mul_(2))  # a merge re-run into the same path
    with pool.get(str(folder)) as new:
        assert new.model is not old.model and pool.loads == 2
        assert new.model.model.embed_tokens.weight[0, 0].item() == pytest.approx(2 * old_weight)
        assert pool.used_bytes == old.nbytes + new.nbytes  # the old copy is still generating
        old.release()
        assert pool.used_bytes == new.nbytes  # ... and freed when it finishes
    assert len(pool.loaded()) == 1


def test_a_released_handle_no_longer_gives_the_model(models):
    refs, size = models
    handle = ModelPool(3 * size, "cpu").get(refs[0])
    handle.release()
    handle.release()  # idempotent
    with pytest.raises(MergeStudioError, match="released"):
        _ = handle.model


def test_budget_and_policy_errors_are_user_errors(models, tmp_path):
    refs, _ = models
    with pytest.raises(MergeStudioError, match="not a positive size"):
        ModelPool("lots", "cpu")
    hosted = ModelPool("1GB", "cpu", SourcePolicy(hosted=True, allowed_roots=(tmp_path,)))
    with pytest.raises(SourceError, match="hosted"):
        hosted.get(refs[0])
    with pytest.raises(SourceError, match="not found"):
        ModelPool("1GB", "cpu").get(str(tmp_path / "missing"))


def test_a_hub_model_is_downloaded_once_per_pool(models, tmp_path, monkeypatch):
    refs, size = models
    monkeypatch.chdir(tmp_path)  # so "some-org/chat-model" is not a relative folder
    asked = []

    def hub(repo_id, revision, patterns, token=None):  # stands in for huggingface_hub.snapshot_download
        asked.append((repo_id, revision))
        return refs[0]

    pool = ModelPool(3 * size, "cpu", download=hub)
    with pool.get("some-org/chat-model@main") as first, pool.get("some-org/chat-model@main") as second:
        assert first.model is second.model and first.ref == "some-org/chat-model@main"
    assert asked == [("some-org/chat-model", "main")] and pool.loads == 1


def test_two_users_whose_panel_sets_cross_both_get_them(models, monkeypatch):
    """Room for two models; one user wants (a, b), another (c, d), at once. Holding one model
    while waiting for room for the next would leave each waiting on the other until one failed."""
    import chat.pool

    refs, size = models
    real_load = chat.pool.load_model

    def slow_load(*args, **kwargs):  # a real load, made slow enough that the two requests overlap
        time.sleep(0.3)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(chat.pool, "load_model", slow_load)
    pool = ModelPool(int(2.5 * size), "cpu", wait_s=20)
    start, results = threading.Barrier(2), {}

    def user(name, wanted):
        start.wait()
        try:
            handles = pool.get_many(wanted)
            results[name] = [h.ref for h in handles]
            time.sleep(0.2)
            for handle in handles:
                handle.release()
        except MergeStudioError as exc:
            results[name] = exc

    threads = [threading.Thread(target=user, args=("one", refs[:2])), threading.Thread(target=user, args=("two", refs[2:4]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == {"one": refs[:2], "two": refs[2:4]}
    assert pool.used_bytes <= pool.budget_bytes


def test_a_handle_collected_while_the_pool_is_locked_does_not_freeze_it(models, monkeypatch):
    """A handle dropped in a reference cycle is released by the cyclic garbage collector, which
    runs at whatever allocation comes next: here, one made while the pool holds its lock."""
    import chat.pool

    refs, size = models
    pool = ModelPool(3 * size, "cpu")
    cycle = {"handle": pool.get(refs[0])}
    cycle["self"] = cycle
    del cycle
    real_row = chat.pool.LoadedModel

    def row_after_a_collection(*args):  # the collection lands inside ``with pool._lock``
        gc.collect()
        return real_row(*args)

    monkeypatch.setattr(chat.pool, "LoadedModel", row_after_a_collection)
    gc.disable()
    try:
        answer = []
        worker = threading.Thread(target=lambda: answer.append(pool.loaded()), daemon=True)
        worker.start()
        worker.join(timeout=10)
    finally:
        gc.enable()
    assert answer, "the pool froze: the finalizer waited for the lock its own thread held"
    assert pool.loaded()[0].leases == 0, "the dropped handle's lease was released"


def test_is_loaded_tells_without_loading_or_downloading(models):
    refs, size = models
    pool = ModelPool(3 * size, "cpu")
    assert not pool.is_loaded(refs[0]) and not pool.is_loaded("org/not-fetched")
    with pool.get(refs[0]):
        assert pool.is_loaded(refs[0]) and not pool.is_loaded(refs[1])
    assert pool.loads == 1
