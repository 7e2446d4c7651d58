"""Hostile text in a real browser: HTML and JavaScript in model names, chat prompts and recipe
text are shown as text and never run (Debian's chromium through playwright)."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_studio import launch, tiny  # noqa: F401  (fixtures)

CHROMIUM = "/usr/bin/chromium"
PAYLOAD = '<img src=x onerror="window.__xss=(window.__xss||0)+1">'
SCRIPT = "<script>window.__xss=(window.__xss||0)+1</script>"


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (apt install chromium)")
def test_html_in_names_prompts_and_recipes_is_text(tiny, tmp_path):  # noqa: F811
    from playwright.sync_api import sync_playwright

    from studio import Settings

    settings = Settings(work_dir=tmp_path / "work", device="cpu").with_models(
        {"base": tiny.base, f"evil {PAYLOAD}": tiny.finetuned[0], "plain": tiny.finetuned[1]})
    demo, url = launch(settings)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--headless", "--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(90_000)
            page.goto(url)
            page.get_by_role("tab", name="Models").wait_for()
            page.get_by_text("All 2 source model(s) can be merged with the base").wait_for()

            # the recipe editor: a pasted script stays text in the YAML view
            page.get_by_role("tab", name="Merge").click()
            editor = page.locator(".cm-content")
            editor.click()
            page.keyboard.press("Control+End")
            page.keyboard.type(f"\n# {SCRIPT} {PAYLOAD}\n")

            # the chat: a prompt with HTML is sent to two models and echoed back as text
            page.get_by_role("tab", name="Chat").click()
            page.get_by_placeholder("Type a message").fill(f"hello {PAYLOAD} {SCRIPT}")
            page.get_by_role("button", name="Send").click()
            page.get_by_text("Done in").first.wait_for()
            page.wait_for_timeout(1000)
            assert page.evaluate("() => window.__xss") is None, "injected HTML ran in the page"
            assert page.locator("img[src='x']").count() == 0
            shown = page.get_by_test_id("user").first.inner_text()
            assert "<img src=x" in shown and "&lt;" not in shown, shown  # the prompt, exactly as typed
            page.get_by_role("tab", name="Merge").click()
            assert page.get_by_text("evil <img src=x", exact=False).count() >= 1  # the model name, as text
            page.screenshot(path=str(tmp_path / "hostile.png"), full_page=True)
            browser.close()
    finally:
        demo.close()
