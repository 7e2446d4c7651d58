"""Models tab: choose the base and the fine-tuned sources; see what each is and whether it merges."""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from merging.model_info import compatibility, describe
from merging.units import format_bytes, format_count
from studio import session
from studio.common import UI, as_text, handler, hub_token, session_hash
from studio.settings import Settings

COLUMNS = ["role", "model", "architecture", "parameters", "dtype", "size on disk",
           "memory float32 / bfloat16 (largest layer)", "compatibility with the base"]


@dataclass
class ModelsTab:
    base: gr.Dropdown
    sources: gr.Dropdown
    inspect_button: gr.Button
    verdict: gr.Markdown
    table: gr.Dataframe


# -- layout ---------------------------------------------------------------------------------------

def layout(settings: Settings) -> ModelsTab:
    family = settings.family()
    base_ref = family[settings.base_name()]
    choices = session.model_choices(settings)
    where = "a Hub id such as org/name" + ("" if settings.hosted else ", or a local model folder")
    gr.Markdown(
        "Pick the **base** model and the **fine-tuned** models to merge into it. The demo family is "
        f"preselected; type {where} to add others. Models are inspected from their headers and "
        "config (no weights are loaded)."
    )
    with gr.Row():
        base = gr.Dropdown(choices, value=base_ref, label="Base model", allow_custom_value=True, scale=1,
                           info="task vectors are measured from it")
        sources = gr.Dropdown(choices, value=[ref for ref in family.values() if ref != base_ref], multiselect=True,
                              allow_custom_value=True, label="Fine-tuned source models", scale=2,
                              info=f"fine-tunes of the base: {where}")
    inspect_button = gr.Button("Inspect models", variant="secondary")
    verdict = gr.Markdown()
    table = gr.Dataframe(headers=COLUMNS, interactive=False, wrap=True, label="Models", elem_id="models-table",
                         column_widths=["6%", "11%", "13%", "9%", "7%", "8%", "16%", "30%"])
    return ModelsTab(base, sources, inspect_button, verdict, table)


# -- handlers -------------------------------------------------------------------------------------

def inspect_rows(settings: Settings, base: str, sources: list[str], hash_: str | None,
                 token: str | None = None) -> tuple[list[list], str]:
    """The table rows and a one-line verdict for ``base`` and ``sources``."""
    if not base:
        raise gr.Error("choose a base model first")
    policy = session.policy(settings, hash_, token)
    base_info = describe(base, policy)
    rows, problems = [], []
    for role, ref in [("base", base)] + [("source", s) for s in sources or []]:
        info = base_info if role == "base" else describe(ref, policy)
        ok, verdict = (not info.error, info.error or "base model") if role == "base" else compatibility(base_info, info)
        label = session.label_of(settings, ref)
        if not ok:
            problems.append(f"**{as_text(label)}**: {as_text(verdict)}")
        memory = info.memory
        rows.append([
            role, label, info.architecture or "?", format_count(info.parameters),
            ", ".join(info.dtypes) or "?", format_bytes(info.disk_bytes),
            (f"{format_bytes(memory['float32'])} / {format_bytes(memory['bfloat16'])} ({format_bytes(memory['largest layer'])})"
             if memory else "?"),
            ("✓ " if ok else "✗ ") + verdict,
        ])
    if not sources:
        verdict = "Choose at least one fine-tuned source model to merge with the base."
    elif problems:
        verdict = "**Not everything can be merged:**\n\n" + "\n\n".join(f"- {p}" for p in problems)
    else:
        verdict = f"✓ All {len(sources)} source model(s) can be merged with the base."
    return rows, verdict


def inspect(settings: Settings, base: str, sources: list[str], request: gr.Request,
            oauth_token: gr.OAuthToken | None = None):
    return inspect_rows(settings, base, sources, session_hash(request), hub_token(oauth_token))


# -- wiring ---------------------------------------------------------------------------------------

INSPECT = dict(concurrency_id="inspect", concurrency_limit=4, show_progress="minimal", **UI)


def wire(tab: ModelsTab, settings: Settings, demo: gr.Blocks) -> None:
    run = handler(inspect, settings)
    for trigger in (tab.inspect_button.click, tab.base.change, tab.sources.change, demo.load):
        trigger(run, [tab.base, tab.sources], [tab.table, tab.verdict], **INSPECT)


def build(settings: Settings, demo: gr.Blocks) -> ModelsTab:
    tab = layout(settings)
    wire(tab, settings, demo)
    return tab
