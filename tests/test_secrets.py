"""A token never leaks: not in errors, logs, the merged folder (model card, recipe) or the votes."""

from __future__ import annotations

import logging

import pytest

from merging.engine import merge
from merging.errors import MergeStudioError
from merging.recipe import load_recipe

FAKE_TOKEN = "hf_" + "FakeTokenForLeakTests0123456789abcd"


def test_a_failed_push_never_shows_or_writes_the_token(llama_family, tmp_path, monkeypatch, caplog, capsys):
    import huggingface_hub.constants

    from merging.export import push_to_hub

    monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network here: fail fast
    out = tmp_path / "merged"
    merge(load_recipe({"merge_method": "linear", "models": [str(m) for m in llama_family.finetuned[:2]]}), out, device="cpu")
    caplog.set_level(logging.DEBUG)
    with pytest.raises(MergeStudioError) as failure:
        push_to_hub(out, "someone/merged", False, FAKE_TOKEN)
    captured = capsys.readouterr()
    places = {"error": str(failure.value), "logs": caplog.text, "stdout": captured.out, "stderr": captured.err}
    places.update({f"output {p.name}": p.read_text(errors="replace") for p in out.iterdir() if p.suffix in (".md", ".yaml", ".json")})
    assert "pushing to the Hub failed" in places["error"]
    for where, text in places.items():
        assert FAKE_TOKEN not in text, f"the token leaked into {where}"


def test_votes_redact_anything_shaped_like_a_token(tmp_path):
    from merging.errors import redact

    assert FAKE_TOKEN not in redact(f"my token is {FAKE_TOKEN}, keep it")
