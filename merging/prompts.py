"""Conversations as a model reads them: its chat template, or plain text when it has none.

Base models (a Llama or Mistral base, most pre-trained checkpoints) ship no chat template, and
transformers refuses ``apply_chat_template`` for them. Such a model is prompted as a plain
transcript that it continues::

    User: What is the capital of France?
    Assistant:

and its answer ends where it starts writing the next ``User:`` turn itself. Calibration,
evaluation, the DARE sweep and the chat all render conversations here, so a model without a
template is prompted the same way everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from merging.errors import MergeStudioError

Message = dict  # {"role": "system" | "user" | "assistant", "content": str}
PLAIN_LABELS = {"system": "System", "user": "User", "assistant": "Assistant"}
PLAIN_STOP = ("\nUser:",)


@dataclass(frozen=True)
class Prompt:
    """A conversation rendered for one model: the text to encode and how its answer ends."""

    text: str
    add_special_tokens: bool  # False when the chat template already wrote BOS and friends
    stop_strings: tuple[str, ...]  # the answer ends before any of these
    templated: bool  # False: plain-completion mode (the model has no chat template)


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(tokenizer, messages: Sequence[Message], *, add_generation_prompt: bool = True) -> Prompt:
    """``messages`` in the model's chat template, or as a plain ``User: / Assistant:`` transcript.

    With ``add_generation_prompt`` the text ends where the assistant's reply begins (a chat
    template's assistant header, or ``Assistant:``).
    """
    if has_chat_template(tokenizer):
        try:
            text = tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                                 tokenize=False)
        except Exception as exc:  # jinja raises TemplateError (or anything a template's raise_exception says)
            raise MergeStudioError(f"this model's chat template rejects the conversation: {exc}") from None
        return Prompt(text, False, (), True)
    text = "\n".join(f"{PLAIN_LABELS.get(m['role'], m['role'])}: {m['content']}" for m in messages)
    if add_generation_prompt:
        text += f"\n{PLAIN_LABELS['assistant']}:"
    return Prompt(text, True, PLAIN_STOP, False)


def encode(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of a rendered prompt."""
    return list(tokenizer(prompt.text, add_special_tokens=prompt.add_special_tokens)["input_ids"])


def cut_at_stop(text: str, prompt: Prompt) -> str:
    """An answer up to the first stop string of ``prompt`` (plain mode: the model's own next turn),
    without the space a transcript's ``Assistant:`` is followed by."""
    for stop in prompt.stop_strings:
        if stop in text:
            text = text[: text.index(stop)]
    return text if prompt.templated else text.lstrip()
