"""Limits of a launched studio that need their own server: one hosted session cannot chat with
another's merge, and a model over the chat memory budget is refused before loading, with the
numbers, through the API a visitor uses."""

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
