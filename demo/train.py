"""Train one demo expert: a LoRA adapter that teaches the base model one task.

Small, deterministic (a fixed seed per expert, fixed data order) and CPU-friendly: only the
answer tokens are scored, the prompt is the model's own chat template. General prompts answered
by the base itself are mixed in (self-distillation), so the expert keeps the base's chat
behaviour. Each expert has its own seed, so its adapter starts from its own random A, as
independent fine-tunes do: with one shared seed the three adapters' A matrices stayed ~0.9
cosine-similar and their task vectors ~0.5, far more aligned than real fine-tunes.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Callable

import torch

from demo.lora import add_lora, save_adapter
from demo.tasks import REPLAY_PROMPTS, TASKS, Task
from evaluation.scoring import generate_answers
from merging.prompts import encode as encode_prompt
from merging.prompts import render
from merging.runtime import load_model

RANK, ALPHA = 8, 16
BATCH = 8


def encode(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """Token ids of the chat with the answer, and labels that score only the answer (and its end)."""
    question = [{"role": "user", "content": prompt}]
    prompt_ids = encode_prompt(tokenizer, render(tokenizer, question))
    full_ids = encode_prompt(tokenizer, render(tokenizer, [*question, {"role": "assistant", "content": answer}],
                                               add_generation_prompt=False))
    assert full_ids[: len(prompt_ids)] == prompt_ids, "the conversation does not extend the prompt"
    labels = [-100] * len(prompt_ids) + full_ids[len(prompt_ids):]
    return full_ids, labels


def batches(encoded: list[tuple[list[int], list[int]]], pad_id: int, steps: int, seed: int):
    order = random.Random(seed)
    pool: list[int] = []
    for _ in range(steps):
        if len(pool) < BATCH:
            refill = list(range(len(encoded)))
            order.shuffle(refill)
            pool += refill
        chosen, pool = pool[:BATCH], pool[BATCH:]
        length = max(len(encoded[i][0]) for i in chosen)
        ids = torch.full((BATCH, length), pad_id)
        labels = torch.full((BATCH, length), -100)
        mask = torch.zeros((BATCH, length), dtype=torch.long)
        for row, i in enumerate(chosen):
            x, y = encoded[i]
            ids[row, : len(x)] = torch.tensor(x)
            labels[row, : len(y)] = torch.tensor(y)
            mask[row, : len(x)] = 1
        yield ids, labels, mask


STEPS = 90  # with 48 replayed prompts the task loss reaches ~0.01 by step 90


def expert_seed(task: Task) -> int:
    return 1000 + list(TASKS).index(task.name)


def train_expert(
    base_dir: Path, task: Task, out_path: Path, *, steps: int = STEPS, lr: float = 1e-3, seed: int | None = None,
    report: Callable[[str], None] = print,
) -> Path:
    """Train ``task``'s adapter on the base and save it to ``out_path``."""
    seed = expert_seed(task) if seed is None else seed
    torch.manual_seed(seed)
    model, tokenizer = load_model(base_dir, device="cpu", dtype=torch.float32, purpose="training")
    report(f"{task.name}: recording the base model's answers to {len(REPLAY_PROMPTS)} general prompts")
    replay = list(zip(REPLAY_PROMPTS, generate_answers(model, tokenizer, list(REPLAY_PROMPTS), max_new_tokens=48)))
    wrapped = add_lora(model, RANK, ALPHA, seed)
    trainable = [p for lora in wrapped.values() for p in (lora.lora_A, lora.lora_B)]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    encoded = [encode(tokenizer, ex.prompt, ex.answer) for ex in task.train_examples()]
    encoded += [encode(tokenizer, prompt, answer.strip()) for prompt, answer in replay]
    model.train()
    started = time.perf_counter()
    for step, (ids, labels, mask) in enumerate(batches(encoded, tokenizer.pad_token_id or 0, steps, seed), 1):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps:
            report(f"{task.name}: step {step}/{steps} loss {loss.item():.4f} ({time.perf_counter() - started:.0f} s)")
    save_adapter(out_path, wrapped, RANK, ALPHA, {"task": task.name, "steps": str(steps), "lr": str(lr), "seed": str(seed)})
    return out_path
