"""Chat tab: 2-4 models side by side on one input, streaming together; blind A/B with votes.

Models come from the shared ``chat`` pool (one loaded copy per model for every user, within
its memory budget); generation is ``chat.stream_many`` (each model's chat template, or plain
completion for a model without one; one seeded sampler per panel, so the same seed gives
comparable runs). Which model answers what, openly or blind, is ``chat.arena``'s: a blind
comparison is a ``chat.ABSession`` kept in this user's ``gr.State``, named only after the vote.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import gradio as gr

from chat import ABSession, ModelPool, SamplingParams, check_message
from chat.ab import without_last_turn
from chat.arena import close_round, open_round
from merging.endpoints import is_endpoint
from merging.errors import MergeStudioError
from studio import session, zerogpu
from studio.common import CHAT, INSTANT, UI, as_text, handler, session_hash, stop_button, stoppable
from studio.session import StopSignal
from studio.settings import Settings

PANELS = 4
UPDATE_EVERY_S = 0.08  # at most ~12 screen updates a second, however fast tokens come
VOTES = {"A is better": "A", "B is better": "B", "Tie": "tie", "Both are bad": "both_bad"}
PLAIN = " · plain completion (no chat template)"


@dataclass
class ChatTab:
    count: gr.Radio
    blind: gr.Checkbox
    columns: list[gr.Column]
    pickers: list[gr.Dropdown]
    chatbots: list[gr.Chatbot]
    vote_row: gr.Row
    vote_buttons: list[gr.Button]
    reveal: gr.Markdown
    message: gr.Textbox
    send: gr.Button
    stop_button: gr.Button
    regenerate: gr.Button
    clear: gr.Button
    status: gr.Markdown
    sampling: list  # temperature, top-p, max new tokens, seed
    conversations: gr.State
    ab: gr.State
    stop: gr.State


# -- layout ---------------------------------------------------------------------------------------

def layout(settings: Settings) -> ChatTab:
    family = list(settings.family().values())
    choices = session.model_choices(settings, endpoints=True)
    gr.Markdown("One message goes to every panel; the answers stream side by side. Each model uses its "
                "own chat template (a model without one continues a plain transcript, and its panel says so); "
                "the same seed gives the same sampling in every panel, so runs compare.")
    with gr.Row():
        count = gr.Radio([2, 3, 4], value=2, label="Panels", scale=1)
        blind = gr.Checkbox(False, label="Blind A/B", scale=1,
                            info="two of the panels' models, drawn at random and named only after your vote; "
                                 "a vote saves both conversations with it on the server, for the A/B tally")
    columns, pickers, chatbots = [], [], []
    with gr.Row(equal_height=True):
        for i in range(PANELS):
            with gr.Column(visible=i < 2, min_width=260) as column:
                ref = family[i % len(family)] if i < len(family) else family[-1]
                pickers.append(gr.Dropdown(choices, value=ref, label=f"Panel {i + 1} model", allow_custom_value=True))
                # Plain text, not Markdown: prompts and model output are shown exactly as written, and any
                # HTML in them stays text (Gradio's sanitizer would keep tags like <img>).
                chatbots.append(gr.Chatbot(label=session.label_of(settings, ref), height=420, buttons=["copy"],
                                           feedback_options=None, render_markdown=False))
            columns.append(column)
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
        sampling = [gr.Slider(0, 2, value=0.7, step=0.05, label="temperature", info="0 = greedy"),
                    gr.Slider(0.05, 1, value=0.9, step=0.05, label="top-p"),
                    gr.Slider(1, 1024, value=256, step=1, label="max new tokens"),
                    gr.Number(0, label="seed", precision=0, minimum=0)]
    return ChatTab(count, blind, columns, pickers, chatbots, vote_row, vote_buttons, reveal, message, send, stop,
                   regenerate, clear, status, sampling, gr.State(_empty()), gr.State(None), gr.State(StopSignal()))


# -- handlers -------------------------------------------------------------------------------------

def _empty() -> list[list[dict]]:
    return [[] for _ in range(PANELS)]


def _shown(messages: list[dict]) -> list[dict]:
    """Messages as the chatbot shows them: HTML special characters escaped, so a prompt or an
    answer containing tags is displayed as the text it is (Gradio's sanitizer keeps tags such as
    <img>). The conversations sent to the models keep the raw text."""
    return [{**m, "content": as_text(m["content"])} for m in messages]


def respond(settings: Settings, pool: ModelPool, text: str, n: int, is_blind: bool, models: list[str], convs: list,
            ab: ABSession | None, params: SamplingParams, stop_event, hash_: str | None, done: list,
            again: bool = False):
    """Stream the answers into the panels; yields (message, *chatbots, convs, ab, status). A panel
    whose model has no chat template says so in its label (plain-completion mode)."""
    started = time.monotonic()
    round_ = open_round(text, models[:n], convs[:n], ab, params, session.policy(settings, hash_), blind=is_blind,
                        again=again)
    answers, plain = [""] * len(round_.targets), [False] * len(round_.targets)

    def view(note: str, final: bool = False):
        boxes = [gr.skip()] * PANELS
        for k, panel in enumerate(round_.panels):
            messages = _shown(round_.asked[k] + [{"role": "assistant", "content": answers[k] or ("" if final else "…")}])
            name = f"Model {'AB'[k]}" if is_blind else session.label_of(settings, round_.targets[k], done)
            # blind: the labels go back to Model A / B (a previous comparison's reveal must not stay)
            boxes[panel] = gr.Chatbot(messages, label=name + (PLAIN if plain[k] else "")) if is_blind or plain[k] else messages
        return ("", *boxes, gr.skip(), gr.skip(), note)

    local = [ref for ref in round_.targets if not is_endpoint(ref)]  # endpoints answer from their servers
    ready = all(pool.is_loaded(ref) for ref in local)
    yield view("Generating…" if ready else "Loading the models (or waiting for memory other chats are using)…")
    with pool.leased(local) as handles:
        templated = iter(handle.templated for handle in handles)
        plain = [False if is_endpoint(ref) else not next(templated) for ref in round_.targets]
        yield view("Generating…")
        last = 0.0
        # loaded here, on the pool's device; the answers themselves are a GPU call on ZeroGPU
        generate = zerogpu.answers(pool)
        for index, so_far in generate(round_.targets, round_.asked, params, None if zerogpu.ACTIVE else stop_event):
            answers[index] = so_far
            if time.monotonic() - last >= UPDATE_EVERY_S:
                last = time.monotonic()
                yield view("Generating…")
    convs = close_round(round_, answers, convs)
    note = f"{'Stopped' if stop_event.is_set() else 'Done'} in {time.monotonic() - started:.1f} s."
    if is_blind:
        note += " Which answer is better? Vote below to see which model was which."
    final = view(note, final=True)
    yield (final[0], *final[1:PANELS + 1], convs, round_.ab, note)


def send(settings: Settings, pool: ModelPool, text, n, is_blind, m1, m2, m3, m4, convs, ab, temp, p, max_new,
         seed_value, signal: StopSignal, done: list, request: gr.Request):
    params = SamplingParams(temp, p, max_new, seed_value or 0)
    yield from respond(settings, pool, check_message(text), int(n), is_blind, [m1, m2, m3, m4], convs, ab, params,
                       signal.event, session_hash(request), done)


def regenerate(settings: Settings, pool: ModelPool, n, is_blind, m1, m2, m3, m4, convs, ab, temp, p, max_new,
               seed_value, signal: StopSignal, done: list, request: gr.Request):
    params = SamplingParams(temp, p, max_new, seed_value or 0)
    n, hash_, models = int(n), session_hash(request), [m1, m2, m3, m4]
    if is_blind:
        if ab is None or ab.voted:
            raise MergeStudioError("nothing to regenerate yet; send a message first")
        yield from respond(settings, pool, "", n, True, models, convs, ab, params, signal.event, hash_, done, again=True)
        return
    last = next((m["content"] for c in convs[:n] for m in reversed(c) if m["role"] == "user"), None)
    if last is None:
        raise MergeStudioError("nothing to regenerate yet; send a message first")
    trimmed = [without_last_turn(c) for c in convs[:n]]
    yield from respond(settings, pool, last, n, False, models, trimmed + convs[n:], None, params, signal.event, hash_,
                       done)


def clear_all():
    return ("", *[[] for _ in range(PANELS)], _empty(), None, "", "")


def show_panels(n, is_blind):
    return [gr.Column(visible=i < (2 if is_blind else int(n))) for i in range(PANELS)]


def switch_blind(settings: Settings, n, is_blind, m1, m2, m3, m4, done):
    n = 2 if is_blind else int(n)
    names = [session.label_of(settings, m, done) for m in (m1, m2, m3, m4)]
    columns = [gr.Column(visible=i < n) for i in range(PANELS)]
    pickers = [gr.Dropdown(visible=not is_blind) for _ in range(PANELS)]
    labels = [gr.Chatbot(label=f"Model {'AB'[i]}" if is_blind and i < 2 else names[i], value=[]) for i in range(PANELS)]
    note = ("Blind A/B: two of the models picked in the panels (pick them before turning this on) answer "
            "as Model A and Model B. Vote to see which was which." if is_blind else "")
    return (*columns, *pickers, *labels, gr.Row(visible=is_blind), _empty(), None, note)


def vote(settings: Settings, choice_text: str, ab: ABSession | None, done: list):
    if ab is None:
        raise MergeStudioError("start a blind comparison first: send a message")
    revealed = ab.vote(VOTES[choice_text])
    names = {k: session.label_of(settings, v, done) for k, v in revealed.items()}
    text = (f"**Model A** was **{as_text(names['A'])}**, **Model B** was **{as_text(names['B'])}**. Your vote "
            f"(*{choice_text}*) is recorded. Send a new message to start another comparison.")
    return (gr.Chatbot(label=f"Model A: {names['A']}"), gr.Chatbot(label=f"Model B: {names['B']}"), ab, text, "")


def forget_panel(index: int, convs: list, is_blind: bool):
    """A panel's own trash button: forget that panel's conversation (blind: the comparison ends)."""
    if is_blind:
        return _empty(), None, *[[] for _ in range(PANELS)]
    return [[] if i == index else c for i, c in enumerate(convs)], gr.skip(), *[gr.skip()] * PANELS


def relabel(settings: Settings, model: str, done: list):
    return gr.Chatbot(label=session.label_of(settings, model, done))


def offer_results(settings: Settings, done: list, *values):
    return [gr.Dropdown(choices=session.model_choices(settings, done, endpoints=True), value=v) for v in values]


# -- wiring ---------------------------------------------------------------------------------------

def wire(tab: ChatTab, settings: Settings, pool: ModelPool, results: gr.State) -> None:
    panels = [tab.count, tab.blind, *tab.pickers, tab.conversations, tab.ab, *tab.sampling, tab.stop, results]
    outputs = [tab.message, *tab.chatbots, tab.conversations, tab.ab, tab.status]
    streaming = dict(concurrency_id=CHAT, concurrency_limit=settings.chat_concurrency, show_progress="hidden", **UI)
    for trigger in (tab.send.click, tab.message.submit):
        stoppable(trigger, tab.stop, handler(send, settings, pool), [tab.message, *panels], outputs, **streaming)
    stoppable(tab.regenerate.click, tab.stop, handler(regenerate, settings, pool), panels, outputs, **streaming)
    stop_button(tab.stop_button, tab.stop)
    tab.clear.click(clear_all, None, [tab.message, *tab.chatbots, tab.conversations, tab.ab, tab.status, tab.reveal],
                    **INSTANT)
    tab.count.change(show_panels, [tab.count, tab.blind], tab.columns, **INSTANT)
    tab.blind.change(handler(switch_blind, settings), [tab.count, tab.blind, *tab.pickers, results],
                     [*tab.columns, *tab.pickers, *tab.chatbots, tab.vote_row, tab.conversations, tab.ab, tab.reveal],
                     **INSTANT)
    for picker, chatbot in zip(tab.pickers, tab.chatbots):
        picker.change(handler(relabel, settings), [picker, results], [chatbot], **INSTANT)
    for index, chatbot in enumerate(tab.chatbots):
        chatbot.clear(handler(forget_panel, index), [tab.conversations, tab.blind],
                      [tab.conversations, tab.ab, *tab.chatbots], **INSTANT)
    for button in tab.vote_buttons:
        button.click(handler(vote, settings), [button, tab.ab, results],
                     [tab.chatbots[0], tab.chatbots[1], tab.ab, tab.reveal, tab.status], **INSTANT)
    results.change(handler(offer_results, settings), [results, *tab.pickers], tab.pickers, **INSTANT)


def build(settings: Settings, pool: ModelPool, results: gr.State) -> ChatTab:
    tab = layout(settings)
    wire(tab, settings, pool, results)
    return tab
