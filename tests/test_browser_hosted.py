"""The hosted walk (issue #16 item 5): the studio as a Space runs it, in Chromium, with its models
on the local Hub server (``tests/support/hub_server.py``) and Hub ids only.

``SPACE_ID`` is set, so the studio is hosted: no local paths, the visitor's models and pushes go
through the visitor's own token. The sign-in is Gradio's documented stand-in for local runs (off a
Space, ``gr.LoginButton`` signs in without leaving the app and hands the app the placeholder token
``mock-oauth-token-for-local-dev``); the local Hub knows that token as the account ``visitor``,
which may read one private source. The server's own token (``HF_TOKEN``, the Space owner's) must
never reach the Hub on the visitor's behalf: the server records every request's token.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from test_browser_studio import CHROMIUM, TIMEOUT_MS, chat_with_merge, shot
from test_studio import launch, tiny  # noqa: F401  (fixtures)

GRADIO_STAND_IN_TOKEN = "mock-oauth-token-for-local-dev"  # gradio/oauth.py's _get_mocked_oauth_info


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt install chromium)")
def test_a_visitor_signs_in_merges_hub_models_chats_and_pushes(hub, tiny, tmp_path, monkeypatch):  # noqa: F811
    from huggingface_hub import ModelCard
    from playwright.sync_api import sync_playwright

    from studio import Settings

    visitor = hub.add_user("visitor", token=GRADIO_STAND_IN_TOKEN)
    hub.publish("org/base", tiny.base)
    hub.publish("org/expert-a", tiny.finetuned[0])
    hub.publish("visitor-team/expert-b", tiny.finetuned[1], private=True, grant=False, readers=(visitor,))
    monkeypatch.setenv("HF_TOKEN", hub.token)  # the Space owner's token, as a Space's secret would hold it
    models = {"base": "org/base", "expert-a": "org/expert-a", "expert-b": "visitor-team/expert-b"}
    settings = Settings.from_env({"SPACE_ID": "tester/merge-studio", "MERGE_STUDIO_OAUTH": "1",
                                  "MERGE_STUDIO_MODELS": json.dumps(models), "MERGE_STUDIO_DEVICE": "cpu",
                                  "MERGE_STUDIO_WORK_DIR": str(tmp_path / "work")})
    assert settings.hosted and settings.oauth
    demo, url = launch(settings)
    walk_started = len(hub.tokens_seen)  # Gradio's stand-in asked whoami with the owner's token at launch
    errors: list[str] = []
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                                 args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(TIMEOUT_MS)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.goto(url)

            # Signed out, the private source cannot be read: the verdict says why and what to do.
            page.get_by_text("Hosted studio: Hub models only").wait_for()
            page.get_by_text(re.compile("visitor-team/expert-b was not found on the Hub, or it is private")).first.wait_for()
            weights = (tiny.base / "model.safetensors").stat().st_size  # the verdict reads configs and headers only:
            assert all(hub.sent(repo, suffix=".safetensors") < weights for repo in models.values())  # ≤ 100 KB each
            page.get_by_role("button", name=re.compile("Sign in with Hugging Face")).click()
            page.get_by_role("button", name=re.compile("Logout")).wait_for()
            page.get_by_text("All 2 source model(s) can be merged with the base").wait_for()
            shot(page, tmp_path, "hosted-models")

            # The merge downloads the weights: progress shows bytes and rate; Stop ends the download;
            # merging again fetches only what is missing.
            page.get_by_role("tab", name="Merge").click()
            hub.rate = weights / 2  # two seconds per model
            page.get_by_role("button", name="Merge", exact=True).click()
            page.get_by_text(re.compile(r"downloading org/base: .* of .* at .*B/s")).wait_for()
            page.get_by_text(re.compile(r"downloading org/expert-a: ")).wait_for()  # the base is in
            page.get_by_role("button", name="Stop", exact=True).click()
            page.get_by_text(re.compile("download stopped; the files already fetched are kept")).first.wait_for()
            fetched = {repo: hub.sent(repo, suffix=".safetensors") for repo in models.values()}
            hub.rate = None
            page.get_by_role("button", name="Merge", exact=True).click()
            summary = page.locator("#merge-summary")
            summary.get_by_text("Merged").wait_for()
            assert hub.sent("org/base", suffix=".safetensors") == fetched["org/base"]  # not fetched again
            assert all(hub.sent(repo, suffix=".safetensors") >= weights for repo in models.values())

            chat_with_merge(page, "^merged: ")

            page.get_by_role("tab", name="Export").click()
            page.get_by_label("Repository").fill("my-merge")
            page.get_by_role("button", name="Push to the Hub").click()
            page.get_by_text("✓ Pushed to").wait_for()
            assert f"{hub.url}/visitor/my-merge" in page.get_by_text("✓ Pushed to").inner_text()
            shot(page, tmp_path, "hosted-pushed")
            browser.close()
    finally:
        demo.close()
    assert not errors, errors

    # The pushed repo, on the server: private, the visitor's, weights, tokenizer, card and recipe.
    repo = hub.repos["visitor/my-merge"]
    assert repo.private
    files = repo.resolve("main").files
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md", "mergekit_config.yml"} <= set(files)
    card = ModelCard((hub.root / "blobs" / files["README.md"].sha256).read_text())
    assert card.data.base_model_relation == "merge" and set(card.data.base_model) == set(models.values())
    recipe = yaml.safe_load((hub.root / "blobs" / files["mergekit_config.yml"].sha256).read_text())
    assert {entry["model"] for entry in recipe["models"]} <= set(models.values())

    # Whose token went where: the visitor's for their private model and every write; the owner's never.
    walk = list(zip(hub.requests[walk_started:], hub.tokens_seen[walk_started:]))
    assert hub.token not in {token for _, token in walk}
    writes = [token for (method, path, _), token in walk if method in ("POST", "PUT") and "/api/" in path]
    assert writes and set(writes) == {visitor}
