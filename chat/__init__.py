"""Chat with several models side by side: a shared model pool and streaming generation.

    from chat import ModelPool, SamplingParams, stream_many
    pool = ModelPool("4GB")  # one per process, shared by every user
    handles = pool.get_many(["HuggingFaceTB/SmolLM2-135M-Instruct", "out/merged"])
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    try:
        for panel, text_so_far in stream_many(handles, [chat, chat], SamplingParams(seed=1)):
            ...
    finally:
        for handle in handles:
            handle.release()

    from chat import generate  # the one-model API: model reference -> streamed text chunks
    print("".join(generate("out/merged", "Hello!", temperature=0, max_new_tokens=64)))

No UI code here: the studio's Chat tab calls these. ``chat.ab`` runs blind A/B comparisons and
``chat.arena`` decides which model answers which conversation in a side-by-side round.
"""

from chat.ab import VOTE_CHOICES, ABSession, read_votes
from chat.generate import (
    MAX_MESSAGE_CHARS,
    MAX_PROMPT_TOKENS,
    SamplingParams,
    check_message,
    generate,
    render_prompt,
    stream,
    stream_many,
)
from chat.pool import LoadedModel, ModelHandle, ModelPool, default_pool

__all__ = [
    "ABSession", "LoadedModel", "MAX_MESSAGE_CHARS", "MAX_PROMPT_TOKENS", "ModelHandle", "ModelPool",
    "SamplingParams", "VOTE_CHOICES", "check_message", "default_pool", "generate", "read_votes",
    "render_prompt", "stream", "stream_many",
]
