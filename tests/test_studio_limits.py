"""Limits of a hosted studio: one session cannot chat with another's merge; a model over the chat
memory budget is refused before loading, with the numbers, through the API a visitor uses; old
sessions are pruned but an active one never is; bad settings stop the start with a message."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from test_studio import launch, ties_recipe, tiny, tiny_settings  # noqa: F401  (fixtures)


def test_a_hosted_visitor_cannot_chat_with_another_visitors_merge(tiny_settings, tiny):  # noqa: F811
    demo, url = launch(replace(tiny_settings, hosted=True, queue_size=8))
    try:
        alice, mallory = Client(url, verbose=False), Client(url, verbose=False)  # two browsers, two sessions
        merged = alice.predict(ties_recipe(tiny), api_name="/merge_recipe")["output"]
        assert isinstance(alice.predict(merged, "hello", 0.0, 0.9, 4, 0, api_name="/generate"), str)  # her own
        with pytest.raises(AppError, match="local paths are disabled"):
            mallory.predict(merged, "hello", 0.0, 0.9, 4, 0, api_name="/generate")
        with pytest.raises(AppError, match="local paths are disabled"):
            mallory.predict(str(Path(merged).parents[2]), "hello", 0.0, 0.9, 4, 0, api_name="/generate")
        # The offered models stay open to everyone.
        assert isinstance(mallory.predict(str(tiny.base), "hello", 0.0, 0.9, 4, 0, api_name="/generate"), str)
    finally:
        demo.close()


def test_a_model_over_the_chat_budget_is_refused_with_the_numbers(tiny_settings, tiny, monkeypatch):  # noqa: F811
    monkeypatch.setenv("MERGE_STUDIO_CHAT_BUDGET", "100KB")
    demo, url = launch(tiny_settings)
    try:
        client = Client(url, verbose=False)
        with pytest.raises(AppError, match=r"needs about [\d.]+ (KB|MB) of memory .* budget is 100.0 KB") as error:
            client.predict(str(tiny.base), "hello", 0.0, 0.9, 4, 0, api_name="/generate")
        assert "MERGE_STUDIO_CHAT_BUDGET" in str(error.value) and "Traceback" not in str(error.value)
    finally:
        demo.close()


def test_pruning_keeps_a_session_that_wrote_recently_inside_its_folder(tiny_settings, tmp_path):  # noqa: F811
    import os
    import time

    from studio import session

    settings = replace(tiny_settings, hosted=True, work_dir=tmp_path, session_hours=1.0)
    old, active, mine = (session.folder(settings, name) for name in ("old", "active", "mine"))
    for folder in (old, active, mine):
        (folder / "merges").mkdir(parents=True)
        (folder / "merges" / "model.safetensors").write_bytes(b"x")
    two_hours_ago = time.time() - 7200
    for path in (old, old / "merges", old / "merges" / "model.safetensors", active, active / "merges", mine):
        os.utime(path, (two_hours_ago, two_hours_ago))
    # "active" wrote its merge a moment ago, inside merges/: its own folder's time is old.
    session.prune(settings, keep=mine)
    assert not old.exists()
    assert (active / "merges" / "model.safetensors").exists()
    assert mine.exists()


@pytest.mark.parametrize("variable, value, message", [
    ("MERGE_STUDIO_CHAT_BUDGET", "lots", "is not a positive size"),
    ("MERGE_STUDIO_SESSION_HOURS", "abc", "must be a number of hours above 0"),
    ("MERGE_STUDIO_SESSION_HOURS", "-1", "must be a number of hours above 0"),
])
def test_bad_settings_stop_the_start_with_a_message(tiny, variable, value, message):  # noqa: F811
    import json
    import os
    import subprocess
    import sys

    models = json.dumps({"base": str(tiny.base), "ft": str(tiny.finetuned[0])})
    env = {**os.environ, "MERGE_STUDIO_MODELS": models, variable: value, "GRADIO_SERVER_PORT": "1"}
    app = Path(__file__).resolve().parents[1] / "app.py"
    done = subprocess.run([sys.executable, str(app)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
