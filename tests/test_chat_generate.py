"""Streaming generation on tiny real models (and the demo base when it is built)."""

import json
import threading
from itertools import pairwise
import time
from pathlib import Path

import pytest
import torch

from chat.generate import (
    MAX_MESSAGE_CHARS,
    SamplingParams,
    check_message,
    generate,
    render_prompt,
    stream,
    stream_many,
)
from chat.pool import ModelPool
from helpers import copy_model
import demo
from merging.errors import MergeStudioError

HELLO = [{"role": "user", "content": "hello there, how are you"}]


@pytest.fixture(scope="module")
def pool():
    return ModelPool("100MB", "cpu")


@pytest.fixture(scope="module")
def qwen(pool, qwen2_family):
    """Untied embeddings, so greedy decoding of a random model does not just repeat its input."""
    with pool.get(str(qwen2_family.base)) as handle:
        yield handle


def answer(handle, params, messages=HELLO, stop_event=None) -> str:
    return "".join(stream(handle, messages, params, stop_event))


def test_greedy_stream_equals_generate_without_sampling(qwen):
    model, tokenizer = qwen.model, qwen.tokenizer
    text = tokenizer.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    expected = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                              pad_token_id=tokenizer.pad_token_id)
    expected_text = tokenizer.decode(expected[0, ids.shape[1]:], skip_special_tokens=True)
    assert answer(qwen, SamplingParams(temperature=0, max_new_tokens=40)) == expected_text
    assert len(expected_text) > 20


def test_seeded_sampling_is_reproducible_and_the_seed_matters(qwen):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=30, seed=7)
    first = answer(qwen, params)
    torch.manual_seed(123)  # the global RNG plays no part
    assert answer(qwen, params) == first
    assert answer(qwen, SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=30, seed=8)) != first


def test_users_sharing_one_model_get_their_own_seeded_text(qwen):
    """Two users sample from the same loaded copy at once; each gets what it gets alone."""
    seeds = [11, 12, 13]
    alone = [answer(qwen, SamplingParams(temperature=1.0, max_new_tokens=20, seed=s)) for s in seeds]
    together = [None] * len(seeds)

    def user(i):
        together[i] = answer(qwen, SamplingParams(temperature=1.0, max_new_tokens=20, seed=seeds[i]))

    threads = [threading.Thread(target=user, args=(i,)) for i in range(len(seeds))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert together == alone


def test_stop_ends_the_stream_before_the_next_token(qwen):
    stop = threading.Event()
    chunks = stream(qwen, HELLO, SamplingParams(temperature=1.0, max_new_tokens=2000, seed=1), stop)
    next(chunks)
    stop.set()
    started = time.monotonic()
    rest = list(chunks)
    assert len(rest) <= 1, "at most the text held back for an unfinished character may follow"
    assert time.monotonic() - started < 1.0


def test_stream_many_interleaves_panels_and_each_matches_its_own_stream(pool, qwen2_family):
    refs = [str(qwen2_family.base), *map(str, qwen2_family.finetuned)]
    params = SamplingParams(temperature=0.8, max_new_tokens=24, seed=3)
    handles = pool.get_many(refs)
    try:
        updates = list(stream_many(handles, [HELLO] * 3, params))
        alone = [answer(handle, params) for handle in handles]
    finally:
        for handle in handles:
            handle.release()
    order = [index for index, _ in updates]
    assert set(order[:6]) == {0, 1, 2}, f"a panel waited for the others: {order}"
    switches = sum(a != b for a, b in pairwise(order))
    assert switches >= len(order) // 2, f"panels ran one after another: {order}"
    finals = {index: text for index, text in updates}
    assert [finals[i] for i in range(3)] == alone


def test_the_chat_template_is_applied_and_a_model_without_one_gets_a_transcript(pool, qwen, tmp_path):
    templated = render_prompt(qwen.tokenizer, HELLO)
    assert templated.templated and "<|user|>\nhello there" in templated.text and templated.text.endswith("<|assistant|>\n")
    plain = copy_model(qwen.folder, tmp_path / "no-template")
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    with pool.get(str(plain)) as handle:
        prompt = render_prompt(handle.tokenizer, [{"role": "system", "content": "Be brief."}, *HELLO])
        assert prompt.text == "System: Be brief.\nUser: hello there, how are you\nAssistant:"
        assert not prompt.templated and prompt.stop_strings == ("\nUser:",)
        text = answer(handle, SamplingParams(temperature=1.0, max_new_tokens=40, seed=2), messages=[*HELLO])
        assert "\nUser:" not in text and text and not text[0].isspace()


@pytest.mark.parametrize("field, value, words", [
    ("temperature", -0.1, "temperature must be 0 (greedy) to 2"),
    ("temperature", 2.5, "temperature must be 0 (greedy) to 2"),
    ("temperature", float("nan"), "temperature must be a number"),
    ("top_p", 0, "top_p must be above 0, at most 1"),
    ("top_p", 1.2, "top_p must be above 0, at most 1"),
    ("max_new_tokens", 0, "max_new_tokens must be 1 to 2048"),
    ("max_new_tokens", 10.5, "max_new_tokens must be a whole number"),
    ("seed", -1, "seed must be 0 to 2"),
    ("seed", "1", "seed must be a number"),
    ("seed", True, "seed must be a number"),
])
def test_sampling_params_out_of_range_are_refused_by_name(field, value, words):
    with pytest.raises(MergeStudioError, match=words.replace("(", r"\(").replace(")", r"\)")):
        SamplingParams(**{field: value})


def test_sampling_params_accept_what_a_ui_sends():
    params = SamplingParams(temperature=1, top_p=1, max_new_tokens=64.0, seed=5.0)
    assert params.to_dict() == {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 64, "seed": 5}
    assert isinstance(params.max_new_tokens, int) and SamplingParams(temperature=0).greedy


def test_long_or_malformed_input_is_refused_with_a_message(qwen, pool, gpt2_family):
    with pytest.raises(MergeStudioError, match=f"limit is {MAX_MESSAGE_CHARS:,}"):
        check_message("x" * (MAX_MESSAGE_CHARS + 1))
    with pytest.raises(MergeStudioError, match="empty"):
        stream(qwen, [{"role": "user", "content": "  "}], SamplingParams())
    with pytest.raises(MergeStudioError, match="end with a user message"):
        stream(qwen, [*HELLO, {"role": "assistant", "content": "hi"}], SamplingParams())
    with pytest.raises(MergeStudioError, match="message 1"):
        stream(qwen, [{"role": "robot", "content": "hi"}], SamplingParams())
    with pytest.raises(MergeStudioError, match=r"the conversation is \d+ tokens; this model takes at most 10:"):
        stream(qwen, HELLO, SamplingParams(), max_prompt_tokens=10)
    with pytest.raises(MergeStudioError, match="the model in panel 2 takes at most 25") as error:
        stream_many([qwen, qwen], [[{"role": "user", "content": "hi"}], HELLO], SamplingParams(), max_prompt_tokens=25)
    assert qwen.ref not in str(error.value)  # a blind A/B must not learn the model from an error
    with pool.get(str(gpt2_family.base)) as handle:  # 128 positions
        long_chat = [{"role": "user", "content": "word " * 100}]
        with pytest.raises(MergeStudioError, match="takes at most 127"):
            stream(handle, long_chat, SamplingParams())
        # A prompt that fits gets only the room left in the context, not a crash.
        assert answer(handle, SamplingParams(temperature=1.0, max_new_tokens=2048, seed=0))


def test_generate_streams_text_and_releases_its_lease(pool, qwen, qwen2_family):
    ref = str(qwen2_family.base)
    chunks = generate(ref, "hello there, how are you", temperature=0, top_p=1, max_new_tokens=40, seed=0, pool=pool)
    assert "".join(chunks) == answer(qwen, SamplingParams(temperature=0, max_new_tokens=40))
    assert [m.leases for m in pool.loaded() if m.ref == ref] == [1]  # only the fixture's lease remains
    with pytest.raises(MergeStudioError, match="top_p"):
        generate(ref, "hi", top_p=0, pool=pool)


@pytest.mark.skipif(not demo.is_ready(), reason=f"demo family not built in {demo.cache_root()}: run `python -m merging zoo`")
def test_the_demo_base_knows_the_capital_of_france():
    pool = ModelPool("1GB", "cpu")
    with pool.get(str(demo.base_path())) as handle:
        chunks = list(stream(handle, [{"role": "user", "content": "What is the capital of France?"}],
                             SamplingParams(temperature=0, max_new_tokens=24)))
    assert "Paris" in "".join(chunks) and len(chunks) > 1
    assert Path(handle.folder) == demo.base_path().resolve()
