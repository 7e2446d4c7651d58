"""Decoding modes on tiny real models: a static KV cache, alone or with a compiled step (what a
GPU uses), writes exactly the tokens the growing cache writes; slots are reused and reset, and a
run that finds none free (or a conversation longer than a slot) still decodes.

The compiled mode runs here through inductor on the CPU (CUDA graphs are a GPU's part of it,
which needs a GPU to test); its first compilation takes about 20 s.
"""

import threading

import pytest

from chat.decoding import Decoder, decoding_mode
from chat.generate import SamplingParams, stream, stream_many
from chat.pool import ModelPool
from merging.errors import MergeStudioError

HELLO = [{"role": "user", "content": "hello there, how are you"}]
GREEDY = SamplingParams(temperature=0, max_new_tokens=24)
SAMPLED = SamplingParams(temperature=0.9, top_p=0.9, max_new_tokens=24, seed=7)


def answer(handle, params, messages=HELLO) -> str:
    return "".join(stream(handle, messages, params))


@pytest.fixture(scope="module")
def answers(qwen2_family):
    """Each mode's greedy and sampled answers, from a pool of that mode."""
    found = {}
    for mode in ("dynamic", "static", "compiled"):
        pool = ModelPool("100MB", "cpu", decoding=mode)
        with pool.get(str(qwen2_family.base)) as handle:
            assert handle.decoder.mode == mode
            found[mode] = (answer(handle, GREEDY), answer(handle, SAMPLED), handle.decoder)
    return found


@pytest.mark.parametrize("mode", ["static", "compiled"])
def test_a_static_cache_writes_what_the_growing_cache_writes(answers, mode):
    greedy, sampled, decoder = answers[mode]
    assert greedy.strip(), "the tiny model should write something"
    assert (greedy, sampled) == answers["dynamic"][:2]
    assert decoder.fallbacks == 0, "both answers should have used a static slot"


def test_slots_are_reset_and_reused_and_a_busy_model_still_decodes(qwen2_family):
    pool = ModelPool("100MB", "cpu", decoding="static")
    with pool.get(str(qwen2_family.base)) as handle:
        decoder = handle.decoder
        decoder.max_slots = 2
        first = answer(handle, GREEDY)
        assert answer(handle, GREEDY) == first, "a reused slot must start empty"
        # Three panels on one model: two get slots, the third decodes with a dynamic cache.
        finals = dict(stream_many([handle] * 3, [HELLO] * 3, GREEDY))
        assert [finals[i] for i in range(3)] == [first] * 3
        assert decoder._slots == 2 and decoder.fallbacks == 1


def test_a_conversation_longer_than_a_slot_decodes_with_a_growing_cache(qwen2_family):
    pool = ModelPool("100MB", "cpu", decoding="static")
    with pool.get(str(qwen2_family.base)) as handle:
        expected = answer(handle, GREEDY)
        handle.decoder.cache_tokens = 16  # shorter than the prompt plus its answer
        assert answer(handle, GREEDY) == expected
        assert handle.decoder.fallbacks == 1


def test_concurrent_users_of_one_compiled_model_each_get_their_own_answer(answers, qwen2_family):
    pool = ModelPool("100MB", "cpu", decoding="compiled")
    with pool.get(str(qwen2_family.base)) as handle:
        results, start = {}, threading.Barrier(3)

        def user(seed):
            start.wait()
            results[seed] = answer(handle, SamplingParams(temperature=0.9, max_new_tokens=24, seed=seed))

        threads = [threading.Thread(target=user, args=(seed,)) for seed in (7, 8, 9)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert results[7] == answers["dynamic"][1], "a user's seeded answer must not depend on who else decodes"
    assert len(set(results.values())) == 3


def test_the_mode_comes_from_the_setting_and_auto_follows_the_device(monkeypatch):
    import torch

    assert decoding_mode(None, torch.device("cpu")) == "dynamic"
    assert decoding_mode("auto", torch.device("cuda")) == "compiled"
    monkeypatch.setenv("MERGE_STUDIO_CHAT_DECODING", "static")
    assert decoding_mode(None, torch.device("cpu")) == "static"
    monkeypatch.setenv("MERGE_STUDIO_CHAT_DECODING", "fast")
    with pytest.raises(MergeStudioError, match="MERGE_STUDIO_CHAT_DECODING 'fast' is not one of auto, dynamic"):
        decoding_mode(None, torch.device("cpu"))
    with pytest.raises(MergeStudioError, match="decoding mode must be one of"):
        Decoder(torch.nn.Linear(1, 1), "auto")


def test_a_compiled_step_that_fails_ends_that_answer_with_a_message_and_the_next_decodes(qwen2_family, answers):
    """A compiler or CUDA-graph error that warm-up did not meet (on a GPU, say, in another thread)."""
    pool = ModelPool("100MB", "cpu", decoding="compiled")
    with pool.get(str(qwen2_family.base)) as handle:
        decoder = handle.decoder

        def failing_step(**inputs):  # stands in for the compiled graph failing at run time
            raise RuntimeError("CUDA graph replay failed")

        decoder._step = failing_step
        with pytest.raises(MergeStudioError, match="compiled decoding failed for this model.*send your message again"):
            answer(handle, GREEDY)
        assert decoder.mode == "static" and decoder._step is handle.model
        assert answer(handle, GREEDY) == answers["dynamic"][0]
