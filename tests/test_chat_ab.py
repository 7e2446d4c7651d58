"""Blind A/B comparisons: hidden identities, seeded order, one whole JSONL line per vote."""

import json
import threading

import pytest

from chat.ab import ABSession, read_votes
from chat.generate import SamplingParams, stream_many
from chat.pool import ModelPool
from merging.errors import MergeStudioError

PARAMS = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=12, seed=4)


def answered(tmp_path, seed=0, candidates=("m1", "m2")) -> ABSession:
    session = ABSession(list(candidates), tmp_path / "votes.jsonl", seed=seed)
    session.ask("Which is better?", PARAMS)
    session.answer("A", "first answer")
    session.answer("B", "second answer")
    return session


def test_a_blind_comparison_hides_the_models_until_the_vote_and_records_it(tmp_path, llama_family):
    candidates = [str(llama_family.base), *map(str, llama_family.finetuned)]
    session = ABSession(candidates, tmp_path / "votes" / "ab.jsonl", seed=11)
    assert session.names() == ("Model A", "Model B")
    with pytest.raises(MergeStudioError, match="after your vote"):
        session.reveal()
    model_a, model_b = session.models
    assert model_a != model_b and {model_a, model_b} <= set(candidates)

    pool = ModelPool("100MB", "cpu")
    handles = pool.get_many(list(session.models))
    try:
        conversations = session.ask("Say something.", PARAMS)
        finals = dict(stream_many(handles, conversations, PARAMS))
    finally:
        for handle in handles:
            handle.release()
    session.answer("A", finals.get(0, ""))
    session.answer("B", finals.get(1, ""))
    assert session.names() == ("Model A", "Model B")

    assert session.vote("B") == {"A": model_a, "B": model_b}
    assert session.names() == (model_a, model_b)
    (line,) = (tmp_path / "votes" / "ab.jsonl").read_text(encoding="utf-8").splitlines()
    record = json.loads(line)
    assert record["model_a"] == model_a and record["model_b"] == model_b
    assert record["choice"] == "B" and record["winner"] == model_b and record["session"] == session.id
    assert record["conversation_a"] == [
        {"role": "user", "content": "Say something."}, {"role": "assistant", "content": finals.get(0, "")}]
    assert record["conversation_b"][1]["content"] == finals.get(1, "")
    assert record["sampling"] == [PARAMS.to_dict()]
    assert record["time"].endswith("+00:00")
    assert read_votes(tmp_path / "votes" / "ab.jsonl") == [record]


def test_the_pair_and_its_order_come_from_the_session_seed(tmp_path):
    models = ["m1", "m2", "m3"]
    assert ABSession(models, tmp_path / "v", seed=5).models == ABSession(models, tmp_path / "v", seed=5).models
    pairs = {ABSession(models, tmp_path / "v", seed=seed).models for seed in range(60)}
    assert ("m1", "m2") in pairs and ("m2", "m1") in pairs and len(pairs) == 6
    assert len({ABSession(models, tmp_path / "v").models for _ in range(40)}) > 1  # unseeded: fresh draws


def test_votes_are_checked_and_a_session_takes_one(tmp_path):
    with pytest.raises(MergeStudioError, match="two different models"):
        ABSession(["m1", "m1"], tmp_path / "v")
    session = ABSession(["m1", "m2"], tmp_path / "votes.jsonl", seed=0)
    with pytest.raises(MergeStudioError, match="both models must answer"):
        session.vote("A")
    session = answered(tmp_path)
    with pytest.raises(MergeStudioError, match="A, B, tie, both_bad"):
        session.vote("a")
    assert session.vote("both_bad")
    with pytest.raises(MergeStudioError, match="you voted"):
        session.vote("tie")
    with pytest.raises(MergeStudioError, match="you voted"):
        session.ask("more?", PARAMS)
    (record,) = read_votes(tmp_path / "votes.jsonl")
    assert record["choice"] == "both_bad" and record["winner"] is None


def test_a_vote_waits_for_both_answers_to_the_last_message(tmp_path):
    """Voting while the second turn is still streaming (or after it failed) would record a
    conversation ending in an unanswered question, and the answers would then be refused."""
    session = answered(tmp_path)
    session.ask("And now?", PARAMS)
    with pytest.raises(MergeStudioError, match="must answer your last message"):
        session.vote("A")
    session.answer("A", "A's second answer")
    with pytest.raises(MergeStudioError, match="must answer your last message"):
        session.vote("A")
    session.answer("B", "B's second answer")
    session.vote("tie")
    (record,) = read_votes(tmp_path / "votes.jsonl")
    assert [m["content"] for m in record["conversation_b"]] == [
        "Which is better?", "second answer", "And now?", "B's second answer"]


def test_regenerate_and_a_failed_turn_keep_the_conversations_aligned(tmp_path):
    session = answered(tmp_path)
    greedy = SamplingParams(temperature=0)
    a, b = session.regenerate(greedy)
    assert a == b == [{"role": "user", "content": "Which is better?"}]
    session.ask("Try again", PARAMS)  # the regenerated turn got no answer (say, an error): replaced
    assert session.pending()[0] == [{"role": "user", "content": "Try again"}]
    assert session.sampling == [PARAMS.to_dict()]
    session.answer("A", "only A answered")  # B's generation failed
    a, b = session.ask("Once more", greedy)
    assert a == b == [{"role": "user", "content": "Once more"}] and session.sampling == [greedy.to_dict()]


def test_concurrent_votes_never_interleave_and_tokens_are_redacted(tmp_path):
    big = "lorem ipsum " * 3000  # 36 KB per conversation: more than one pipe or buffer write
    sessions = []
    for seed in range(24):
        session = ABSession(["m1", "m2"], tmp_path / "votes.jsonl", seed=seed)
        session.ask(f"my token is hf_{'a' * 34}", PARAMS)
        session.answer("A", big)
        session.answer("B", big)
        sessions.append(session)
    threads = [threading.Thread(target=s.vote, args=("tie",)) for s in sessions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    votes = read_votes(tmp_path / "votes.jsonl")
    assert sorted(v["session"] for v in votes) == sorted(s.id for s in sessions)
    text = (tmp_path / "votes.jsonl").read_text()
    assert "hf_aaaa" not in text and "hf_[redacted]" in text
    assert (tmp_path / "votes.jsonl").stat().st_mode & 0o077 == 0  # conversations are private to the server
