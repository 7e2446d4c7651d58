#!/usr/bin/env python
"""Chat speed: tokens/s of each panel when 1, 2 and 3 panels stream at once, against plain
``model.generate`` of the same model, on the same machine in one run.

The panels are the demo family's base, geography and people models (or ``--models``), one
prompt, greedy decoding, so every panel writes exactly the tokens ``generate`` writes for
its model (checked: the texts must be equal, or the run says so). For each setting:

* ``generate``: the first model alone through ``model.generate(do_sample=False)``;
* ``N panels``: ``chat.stream_many`` on the first N models (what the Chat tab runs); a
  panel's tokens/s is its tokens over the time until its last token, and the total is all
  panels' tokens over the time until the last panel ends.

* ``--endpoint``: the first model served by ``transformers serve`` (``python -m merging serve``,
  same device, float32) and streamed into one panel through the ``openai`` client, as an
  ``openai:`` reference is in the Chat tab (greedy: its text must equal ``generate``'s too).

Each measurement is the median of ``--repeats`` runs after one warm-up of every model.
The issue's CPU targets: one panel at >= 80% of ``generate``; three panels' total no lower
than one panel's. Prints a Markdown table; ``--json PATH`` writes the numbers.

    python bench/chat_speed.py                         # demo family, CPU, ~3 minutes
    python bench/chat_speed.py --max-new-tokens 32 --repeats 1    # quicker
    python bench/chat_speed.py --device cuda          # a GPU: static KV cache + compiled step
    python bench/chat_speed.py --endpoint             # also one panel through transformers serve
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from chat import ModelPool, SamplingParams, stream_many  # noqa: E402
from chat.generate import render_prompt  # noqa: E402

PROMPT = "Write a short story about a lighthouse keeper and the sea."


def demo_models() -> list[str]:
    import demo

    family = demo.ensure_family()
    return [str(family[name]) for name in ("base", "geography", "people")]


def plain_generate(handle, prompt: str, max_new_tokens: int) -> tuple[str, int, float]:
    """(text, new tokens, seconds) of ``generate`` on the prompt as the chat renders it."""
    model, tokenizer = handle.model, handle.tokenizer
    rendered = render_prompt(tokenizer, [{"role": "user", "content": prompt}])
    inputs = tokenizer(rendered.text, add_special_tokens=rendered.add_special_tokens, return_tensors="pt").to(model.device)
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.eos_token_id)
    seconds = time.perf_counter() - started
    new = out[0, inputs["input_ids"].shape[1]:]
    ended = [i for i, t in enumerate(new.tolist()) if t in _eos(model, tokenizer)]
    new = new[: ended[0]] if ended else new
    return tokenizer.decode(new, skip_special_tokens=True), len(new), seconds


def _eos(model, tokenizer) -> set[int]:
    ids = model.generation_config.eos_token_id
    ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
    return ids | ({tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set())


def panels(handles, prompt: str, params: SamplingParams) -> tuple[list[str], list[float], float]:
    """(texts, seconds until each panel's last update, seconds in all) of ``stream_many``."""
    conversations = [[{"role": "user", "content": prompt}] for _ in handles]
    texts, ends = [""] * len(handles), [0.0] * len(handles)
    started = time.perf_counter()
    for index, text in stream_many(handles, conversations, params):
        texts[index], ends[index] = text, time.perf_counter() - started
    return texts, ends, time.perf_counter() - started


def served_rate(ref: str, args, params: SamplingParams, expected: tuple[str, int]) -> dict:
    """One panel streaming ``ref`` from ``transformers serve`` on this machine: tokens/s (the same
    greedy tokens as ``generate``: the text is compared), median of ``args.repeats`` after a warm-up."""
    import socket
    import subprocess

    from merging.serving import _executable, launch, wait_healthy

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    device = "cpu" if args.device == "auto" and not torch.cuda.is_available() else args.device
    launched = launch(ref, "transformers", port=port, device=device)
    process = subprocess.Popen(_executable([*launched.argv, "--dtype", "float32"]), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_healthy(launched, process, timeout_s=300)
        endpoint = launched.endpoint
        panels([endpoint], PROMPT, params)  # warm-up
        runs = [panels([endpoint], PROMPT, params) for _ in range(args.repeats)]
    finally:
        process.terminate()
        process.wait(30)
    text = runs[0][0][0]
    rate = expected[1] / statistics.median([ends[0] for _, ends, _ in runs])
    return {"panels": 1, "via": "transformers serve", "total_tok_s": round(rate, 2),
            "same_text": text.strip() == expected[0].strip()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", help="three model folders (default: the demo family's base, geography, people)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--decoding", choices=["auto", "dynamic", "static", "compiled"], default="auto",
                        help="how the panels decode (chat.decoding); auto: compiled on CUDA, dynamic on CPU")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--endpoint", action="store_true", help="also one panel through transformers serve")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    refs = args.models or demo_models()
    loading = time.perf_counter()
    pool = ModelPool("64GB", args.device, decoding=args.decoding)
    handles = [pool.get(ref) for ref in refs]
    load_s = time.perf_counter() - loading  # with the compilation and warm-up of compiled decoding
    params = SamplingParams(temperature=0, max_new_tokens=args.max_new_tokens)
    expected = []
    for handle in handles:  # warm-up, and the tokens each model writes
        text, count, _ = plain_generate(handle, PROMPT, args.max_new_tokens)
        expected.append((text, count))
        panels([handle], PROMPT, params)

    def median(values):
        return statistics.median(values)

    generate_runs = [plain_generate(handles[0], PROMPT, args.max_new_tokens) for _ in range(args.repeats)]
    generate_rate = expected[0][1] / median([seconds for _, _, seconds in generate_runs])
    rows, mismatches = [], []
    for count in range(1, len(handles) + 1):
        runs = [panels(handles[:count], PROMPT, params) for _ in range(args.repeats)]
        for texts, _, _ in runs[:1]:
            mismatches += [refs[i] for i, text in enumerate(texts) if text.strip() != expected[i][0].strip()]
        per_panel = [expected[i][1] / median([ends[i] for _, ends, _ in runs]) for i in range(count)]
        total = sum(expected[i][1] for i in range(count)) / median([seconds for _, _, seconds in runs])
        rows.append({"panels": count, "per_panel_tok_s": [round(r, 2) for r in per_panel], "total_tok_s": round(total, 2)})

    one = rows[0]["per_panel_tok_s"][0]
    served = served_rate(refs[0], args, params, expected[0]) if args.endpoint else None
    if served is not None:
        rows.append(served)
    result = {
        "device": str(handles[0].device), "dtype": str(pool.dtype).removeprefix("torch."),
        "decoding": pool.decoding, "load_and_warm_up_s": round(load_s, 1),
        "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "models": refs, "prompt": PROMPT, "max_new_tokens": args.max_new_tokens,
        "tokens": [count for _, count in expected], "repeats": args.repeats,
        "generate_tok_s": round(generate_rate, 2), "rows": rows,
        "one_panel_vs_generate": round(one / generate_rate, 3),
        "three_panels_total_vs_one": round(rows[-1]["total_tok_s"] / one, 3) if len(rows) >= 3 else None,
        "greedy_text_differs_from_generate": sorted(set(mismatches)),
    }
    print(f"{result['device']}, {result['dtype']}, {pool.decoding} decoding (models loaded and warmed up in "
          f"{load_s:.0f} s), {result['torch_threads']} torch threads; tokens per model "
          f"{result['tokens']}; median of {args.repeats}\n")
    print("| setting | tokens/s per panel | total tokens/s |\n|---|---|---|")
    print(f"| `model.generate`, model 1 alone | {generate_rate:.2f} | {generate_rate:.2f} |")
    for row in rows:
        if "via" in row:
            print(f"| 1 panel via {row['via']} | {row['total_tok_s']:.2f} | {row['total_tok_s']:.2f} |")
            continue
        print(f"| {row['panels']} panel(s) | {' / '.join(f'{r:.2f}' for r in row['per_panel_tok_s'])} | {row['total_tok_s']:.2f} |")
    print(f"\none panel / generate: {result['one_panel_vs_generate']:.2f} (target >= 0.80); "
          f"three panels' total / one panel: {result['three_panels_total_vs_one']} (target >= 1.00)")
    if served is not None:
        print(f"one panel through transformers serve / in-process: {served['total_tok_s'] / one:.2f}")
        if not served["same_text"]:
            print("warning: the served model's greedy text differs from generate's")
    if mismatches:
        print(f"warning: greedy text differs from generate's for {sorted(set(mismatches))}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    for handle in handles:
        handle.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
