"""The studio's Blocks: the Guide (the story, runnable), then the seven tabs in the order a person
works, and the scripting API."""

from __future__ import annotations

import gradio as gr

from chat import ModelPool
from studio import (api, chat_tab, evaluate_tab, export_tab, guide_tab, merge_tab, models_tab, redundancy_tab,
                    session, tune_tab, zerogpu)
from studio.settings import Settings

CSS = """
#merge-summary code { word-break: break-all; }
.gradio-container { max-width: 1500px !important; }
#models-table { --font-mono: var(--font); }  /* prose, not code: whole words in the headers, a real ✓ */
.guide-cell { padding: 14px 18px !important; margin: 10px 0 !important; }
.guide-summary { border-left: 4px solid #0072B2; padding-left: 12px; }
"""
TABS = ("Guide", "Models", "Merge", "Tune", "Redundancy", "Chat", "Evaluate", "Export")


def build(settings: Settings, pool: ModelPool | None = None) -> gr.Blocks:
    """The studio for ``settings``; ``pool`` (default: a new one from the settings) serves every chat."""
    # the shared pool serves every session's merges; each visitor's own policy is checked before it
    pool = pool or zerogpu.chat_pool(settings, session.policy(settings, None))
    zerogpu.answers(pool)  # the chat's GPU task, made before launch (ZeroGPU registers its tasks at start)
    delete_cache = (3600, int(settings.session_hours * 3600)) if settings.hosted else None
    with gr.Blocks(title="Merge Studio", delete_cache=delete_cache) as demo:
        with gr.Row():
            gr.Markdown("# Merge Studio\nMerge fine-tuned language models at the parameter level, see why merging "
                        "works, and chat with the result beside the models it came from."
                        + ("\n\n*Hosted studio: Hub models only (up to a size limit) besides the demo family; "
                           "merges are kept for this session.*" if settings.hosted else ""))
            if settings.oauth:  # the visitor's own token: their private and gated models, and their pushes
                with gr.Column(scale=0, min_width=240):
                    gr.LoginButton(size="md")
        with gr.Tabs() as tabs:
            if settings.uses_zoo:  # the story is told on the demo family; a studio of other models has no Guide
                with gr.Tab("Guide", id="guide"):
                    guide_tab.build(settings, demo)
            with gr.Tab("Models"):
                models = models_tab.build(settings, demo)
            with gr.Tab("Merge", id="merge"):
                merged = merge_tab.build(settings, demo, models)
            with gr.Tab("Tune"):
                tune_tab.build(settings, demo, models, merged, tabs)
            with gr.Tab("Redundancy"):
                redundancy_tab.build(settings, models, merged.results)
            with gr.Tab("Chat"):
                chat_tab.build(settings, pool, merged.results)
            with gr.Tab("Evaluate"):
                evaluate_tab.build(settings, merged.results, models)
            with gr.Tab("Export"):
                export_tab.build(settings, merged.results)
        api.register(settings, pool)
    demo.queue(default_concurrency_limit=8, max_size=settings.queue_size)
    return demo


def launch_options(settings: Settings) -> dict:
    """Keyword arguments of ``Blocks.launch`` (theme and css go there in Gradio 6)."""
    return {
        "theme": gr.themes.Soft(),
        "css": CSS,
        "max_file_size": "200mb" if settings.hosted else None,
        "show_error": True,
        "footer_links": ["api", "gradio"],
    }
