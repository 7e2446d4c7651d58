"""A served model beside a local one, in the studio (issue #17 item 1): through the scripting API
and in Chromium, the demo base answers from ``transformers serve`` (behind a key-checking proxy)
and from the studio's own process, greedy, side by side; the two answers are the same text."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from gradio_client import Client
from test_browser_studio import CHROMIUM, TIMEOUT_MS, shot
from test_studio import launch

from tests.support.serving import KEY, served  # noqa: F401  (fixture)

QUESTION = "What is the capital of France? Answer in one sentence."


@pytest.fixture(scope="module")
def studio_with_endpoint(served, tmp_path_factory):  # noqa: F811
    import demo
    from studio import Settings

    folder, server, proxy = served
    mp = pytest.MonkeyPatch()
    mp.setenv("MERGE_STUDIO_ENDPOINT_API_KEY", KEY)
    ref = f"openai:{proxy.base_url}#{folder}"
    settings = Settings(work_dir=tmp_path_factory.mktemp("studio-work"), device="cpu", endpoints={"demo base": ref})
    settings = settings.with_models({"base": demo.base_path(), "geography": demo.expert_path("geography")})
    app, url = launch(settings)
    yield url, ref
    app.close()
    mp.undo()


def test_the_api_streams_a_served_model_like_a_local_one(studio_with_endpoint):
    import demo

    url, ref = studio_with_endpoint
    client = Client(url, verbose=False)
    local = client.predict(str(demo.base_path()), QUESTION, 0.0, 1.0, 24, 0, api_name="/generate")
    remote = client.predict(ref, QUESTION, 0.0, 1.0, 24, 0, api_name="/generate")
    assert "Paris" in local and remote == local


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt install chromium)")
def test_a_local_and_a_served_panel_answer_side_by_side_in_the_browser(studio_with_endpoint, tmp_path):
    from playwright.sync_api import sync_playwright

    url, ref = studio_with_endpoint
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(TIMEOUT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.goto(url)
        page.get_by_role("tab", name="Chat").click()
        page.get_by_label("Panel 2 model").click()
        page.get_by_role("option", name="served: demo base").click()
        page.get_by_text("Sampling (shared by every panel)").click()
        page.get_by_label("number input for temperature").fill("0")
        page.get_by_label("number input for temperature").press("Enter")
        page.get_by_placeholder("Type a message").fill(QUESTION)
        page.get_by_role("button", name="Send").click()
        page.get_by_text(re.compile(r"Done in [\d.]+ s")).wait_for()
        local, served_answer = page.get_by_test_id("bot").all_inner_texts()
        assert "Paris" in local and served_answer == local
        shot(page, tmp_path, "endpoint-chat")
        browser.close()
    assert not errors, errors


def test_a_blind_comparison_pairs_a_served_model_with_a_local_one(served, tmp_path, monkeypatch):  # noqa: F811
    """Blind A/B across a local and a served model, through the Chat tab's own handler: both answer
    (greedy: the same text), neither is named until the vote, and the vote reveals both."""
    import threading

    import demo
    from chat import ModelPool, SamplingParams
    from studio import Settings
    from studio.chat_tab import respond

    folder, server, proxy = served
    monkeypatch.setenv("MERGE_STUDIO_ENDPOINT_API_KEY", KEY)
    monkeypatch.setenv("MERGE_STUDIO_VOTES", str(tmp_path / "votes.jsonl"))
    ref = f"openai:{proxy.base_url}#{folder}"
    settings = Settings(work_dir=tmp_path / "work", device="cpu", endpoints={"demo base": ref})
    settings = settings.with_models({"base": demo.base_path(), "geography": demo.expert_path("geography")})
    local = str(demo.base_path())
    updates = list(respond(settings, ModelPool("2GB", "cpu"), QUESTION, 2, True, [local, ref, None, None],
                           [[] for _ in range(4)], None, SamplingParams(0.0, 1.0, 24, 0), threading.Event(), None, []))
    *_, conversations, ab, note = updates[-1]
    assert set(ab.models) == {local, ref} and ab.names() == ("Model A", "Model B") and "Vote below" in note
    answers = [conversations[panel][-1]["content"] for panel in (0, 1)]
    assert "Paris" in answers[0] and answers[0] == answers[1]
    revealed = ab.vote("A")
    assert set(revealed.values()) == {local, ref}
