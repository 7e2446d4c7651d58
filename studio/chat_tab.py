"""Chat tab: 2-4 models side by side on one input, streaming together; blind A/B with votes.

Models come from the shared ``chat`` pool (one loaded copy per model for every user, within
its memory budget); generation is ``chat.stream_many`` (each model's chat template, one seeded
sampler per panel, so the same seed gives comparable runs). A blind comparison is a
``chat.ABSession`` kept in this user's ``gr.State``: it draws two of the panels' models, shows
them as Model A and Model B, appends the vote with both conversations to the votes file, and
only then names them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import gradio as gr

from chat import ABSession, ModelPool, SamplingParams, check_message, stream_many
from chat.ab import without_last_turn
from merging.sources import check_local_access
from merging.errors import MergeStudioError
from studio.common import (CHAT, INSTANT, UI, as_text, label_of, model_choices, session_hash, stop_button, stoppable,
                           user_errors)
from studio.settings import Settings, StopSignal

PANELS = 4
UPDATE_EVERY_S = 0.08  # at most ~12 screen updates a second, however fast tokens come
VOTES = {"A is better": "A", "B is better": "B", "Tie": "tie", "Both are bad": "both_bad"}


@dataclass
class Panel:
    column: gr.Column
    model: gr.Dropdown
    chatbot: gr.Chatbot


def _shown(messages: list[dict]) -> list[dict]:
    """Messages as the chatbot shows them: HTML special characters escaped, so a prompt or an
    answer containing tags is displayed as the text it is (Gradio's sanitizer keeps tags such as
    <img>). The conversations sent to the models keep the raw text."""
    return [{**m, "content": as_text(m["content"])} for m in messages]


def _empty() -> list[list[dict]]:
    return [[] for _ in range(PANELS)]


def build(settings: Settings, pool: ModelPool, results: gr.State) -> None:
    family = list(settings.family().values())
    choices = model_choices(settings)
    gr.Markdown("One message goes to every panel; the answers stream side by side. Each model uses its "
                "own chat template; the same seed gives the same sampling in every panel, so runs compare.")
    with gr.Row():
        count = gr.Radio([2, 3, 4], value=2, label="Panels", scale=1)
        blind = gr.Checkbox(False, label="Blind A/B", scale=1,
                            info="two of the panels' models, drawn at random and named only after your vote; "
                                 "a vote saves both conversations with it on the server, for the A/B tally")
    panels: list[Panel] = []
    with gr.Row(equal_height=True):
        for i in range(PANELS):
            with gr.Column(visible=i < 2, min_width=260) as column:
                ref = family[i % len(family)] if i < len(family) else family[-1]
                model = gr.Dropdown(choices, value=ref, label=f"Panel {i + 1} model", allow_custom_value=True)
                # Plain text, not Markdown: prompts and model output are shown exactly as written, and any
                # HTML in them stays text (Gradio's sanitizer would keep tags like <img>).
                chatbot = gr.Chatbot(label=label_of(settings, ref), height=420, buttons=["copy"], feedback_options=None,
                                     render_markdown=False)
            panels.append(Panel(column, model, chatbot))
    with gr.Row(visible=False) as vote_row:
        vote_buttons = [gr.Button(text, size="sm") for text in VOTES]
    reveal = gr.Markdown()
    with gr.Row():
        message = gr.Textbox(placeholder="Type a message for every panel…", show_label=False, scale=5,
                             lines=1, max_lines=6, submit_btn=False)
        send = gr.Button("Send", variant="primary", scale=1)
    with gr.Row():
        stop = gr.Button("Stop", variant="stop", size="sm")
        regenerate = gr.Button("Regenerate", size="sm")
        clear = gr.Button("Clear all", size="sm")
    status = gr.Markdown()
    with gr.Accordion("Sampling (shared by every panel)", open=False), gr.Row():
        temperature = gr.Slider(0, 2, value=0.7, step=0.05, label="temperature", info="0 = greedy")
        top_p = gr.Slider(0.05, 1, value=0.9, step=0.05, label="top-p")
        max_new_tokens = gr.Slider(1, 1024, value=256, step=1, label="max new tokens")
        seed = gr.Number(0, label="seed", precision=0, minimum=0)

    conversations = gr.State(_empty())
    ab_state = gr.State(None)
    signal = gr.State(StopSignal())
    chatbots = [p.chatbot for p in panels]
    refs = [p.model for p in panels]

    def respond(text: str, n: int, is_blind: bool, models: list[str], convs: list, ab: ABSession | None,
                params: SamplingParams, stop_event, hash_: str | None, again: bool = False):
        """Stream the answers into the panels; yields (message, *chatbots, convs, ab, status)."""
        started = time.monotonic()
        # The pool serves every session's merges; this user may read only the offered models and their own.
        policy = settings.policy(hash_)
        for ref in models[:n]:
            if ref:
                check_local_access(ref, policy)
        convs = [list(c) for c in convs]
        if is_blind:
            if ab is None or ab.voted:
                ab, convs = ABSession([m for m in models[:n] if m]), _empty()
            asked = ab.regenerate(params) if again else ab.ask(text, params)
            targets, panel_of = list(ab.models), [0, 1]
            asked = list(asked)
        else:
            if not all(models[:n]):
                raise MergeStudioError("choose a model for every panel (or show fewer panels)")
            targets, panel_of = list(models[:n]), list(range(n))
            asked = [convs[i] + [{"role": "user", "content": text}] for i in panel_of]
        answers = [""] * len(targets)

        def view(note: str, final: bool = False):
            boxes = [gr.skip()] * PANELS
            for k, panel in enumerate(panel_of):
                messages = asked[k] + [{"role": "assistant", "content": answers[k] or ("…" if not final else "")}]
                # blind: the labels go back to Model A / B (a previous comparison's reveal must not stay)
                messages = _shown(messages)
                boxes[panel] = gr.Chatbot(messages, label=f"Model {'AB'[k]}") if is_blind else messages
            return ("", *boxes, gr.skip(), gr.skip(), note)

        ready = all(pool.is_loaded(ref) for ref in targets)
        yield view("Generating…" if ready else "Loading the models (or waiting for memory other chats are using)…")
        handles = pool.get_many(targets)
        yield view("Generating…")
        try:
            last = 0.0
            for index, so_far in stream_many(handles, asked, params, stop_event):
                answers[index] = so_far
                if time.monotonic() - last >= UPDATE_EVERY_S:
                    last = time.monotonic()
                    yield view("Generating…")
        finally:
            for handle in handles:
                handle.release()
        for k, panel in enumerate(panel_of):
            convs[panel] = asked[k] + [{"role": "assistant", "content": answers[k]}]
            if is_blind:
                ab.answer("AB"[k], answers[k])
        seconds = time.monotonic() - started
        note = f"{'Stopped' if stop_event.is_set() else 'Done'} in {seconds:.1f} s."
        if is_blind:
            note += " Which answer is better? Vote below to see which model was which."
        final = view(note, final=True)
        yield (final[0], *final[1:PANELS + 1], convs, ab, note)

    @user_errors
    def on_send(text, n, is_blind, m1, m2, m3, m4, convs, ab, temp, p, max_new, seed_value, stop_signal,
                request: gr.Request):
        params = SamplingParams(temp, p, max_new, seed_value or 0)
        text = check_message(text)
        yield from respond(text, int(n), is_blind, [m1, m2, m3, m4], convs, ab, params, stop_signal.event,
                           session_hash(request))

    @user_errors
    def on_regenerate(n, is_blind, m1, m2, m3, m4, convs, ab, temp, p, max_new, seed_value, stop_signal,
                      request: gr.Request):
        params = SamplingParams(temp, p, max_new, seed_value or 0)
        n, hash_ = int(n), session_hash(request)
        if is_blind:
            if ab is None or ab.voted:
                raise MergeStudioError("nothing to regenerate yet; send a message first")
            yield from respond("", n, True, [m1, m2, m3, m4], convs, ab, params, stop_signal.event, hash_, again=True)
            return
        last = next((m["content"] for c in convs[:n] for m in reversed(c) if m["role"] == "user"), None)
        if last is None:
            raise MergeStudioError("nothing to regenerate yet; send a message first")
        trimmed = [without_last_turn(c) for c in convs[:n]]
        yield from respond(last, n, False, [m1, m2, m3, m4], trimmed + convs[n:], None, params, stop_signal.event, hash_)

    def on_clear():
        return ("", *[[] for _ in range(PANELS)], _empty(), None, "", "")

    def on_layout(n, is_blind, m1, m2, m3, m4, done):
        n = 2 if is_blind else int(n)
        names = [label_of(settings, m, done) for m in (m1, m2, m3, m4)]
        columns = [gr.Column(visible=i < n) for i in range(PANELS)]
        pickers = [gr.Dropdown(visible=not is_blind) for _ in range(PANELS)]
        labels = [gr.Chatbot(label=f"Model {'AB'[i]}" if is_blind and i < 2 else names[i], value=[]) for i in range(PANELS)]
        note = ("Blind A/B: two of the models picked in the panels (pick them before turning this on) answer "
                "as Model A and Model B. Vote to see which was which." if is_blind else "")
        return (*columns, *pickers, *labels, gr.Row(visible=is_blind), _empty(), None, note)

    @user_errors
    def on_vote(choice_text: str, ab: ABSession | None, done: list):
        if ab is None:
            raise MergeStudioError("start a blind comparison first: send a message")
        revealed = ab.vote(VOTES[choice_text])
        names = {k: label_of(settings, v, done) for k, v in revealed.items()}
        text = (f"**Model A** was **{as_text(names['A'])}**, **Model B** was **{as_text(names['B'])}**. Your vote "
                f"(*{choice_text}*) is recorded. Send a new message to start another comparison.")
        return (gr.Chatbot(label=f"Model A: {names['A']}"), gr.Chatbot(label=f"Model B: {names['B']}"), ab, text, "")

    def on_results(done: list, *values):
        options = model_choices(settings, done)
        return [gr.Dropdown(choices=options, value=v) for v in values]

    sampling = [temperature, top_p, max_new_tokens, seed, signal]
    outputs = [message, *chatbots, conversations, ab_state, status]
    common = dict(concurrency_id=CHAT, concurrency_limit=settings.chat_concurrency, show_progress="hidden", **UI)
    for trigger in (send.click, message.submit):
        stoppable(trigger, signal, on_send, [message, count, blind, *refs, conversations, ab_state, *sampling], outputs,
                  **common)
    stoppable(regenerate.click, signal, on_regenerate, [count, blind, *refs, conversations, ab_state, *sampling], outputs,
              **common)
    stop_button(stop, signal)
    clear.click(on_clear, None, [message, *chatbots, conversations, ab_state, status, reveal], **INSTANT)
    layout_outputs = [*[p.column for p in panels], *refs, *chatbots, vote_row, conversations, ab_state, reveal]
    count.change(lambda n, is_blind: [gr.Column(visible=i < (2 if is_blind else int(n))) for i in range(PANELS)],
                 [count, blind], [p.column for p in panels], **INSTANT)
    blind.change(on_layout, [count, blind, *refs, results], layout_outputs, **INSTANT)
    for panel in panels:
        panel.model.change(lambda m, done: gr.Chatbot(label=label_of(settings, m, done)), [panel.model, results],
                           [panel.chatbot], **INSTANT)
    for index, chatbot in enumerate(chatbots):  # a panel's own trash button: forget that panel's conversation
        def forget(convs: list, is_blind: bool, index=index):
            if is_blind:  # a blind comparison needs both sides: it ends
                return _empty(), None, *[[] for _ in range(PANELS)]
            return [[] if i == index else c for i, c in enumerate(convs)], gr.skip(), *[gr.skip()] * PANELS

        chatbot.clear(forget, [conversations, blind], [conversations, ab_state, *chatbots], **INSTANT)
    for button in vote_buttons:
        button.click(on_vote, [button, ab_state, results], [chatbots[0], chatbots[1], ab_state, reveal, status], **INSTANT)
    results.change(on_results, [results, *refs], refs, **INSTANT)
