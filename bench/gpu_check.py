#!/usr/bin/env python
"""The prepared GPU check (run it through ``bench/gpu_check.sh``): merges against mergekit on a
~1.1B bfloat16 family and the chat's decoding modes, one Markdown table.

Steps (each a subprocess of an existing bench, so every number is measured as the README's are):

1. ``bench/merge_speed.py --size 1b --device cuda --methods ties,linear,tsv,iso_c --floor``:
   wall time, peak RSS and GPU memory of ours and of ``mergekit-yaml --cuda`` (TIES, linear;
   mergekit has no TSV or Iso-C), and the read+write floor.
2. ``bench/chat_speed.py --device cuda`` on three random models shaped like SmolLM2-135M (30 layers,
   width 576; a 512-token vocabulary from the tests' tokenizer), with ``--decoding compiled`` and
   ``--decoding dynamic``: tokens/s per panel with 1, 2 and 3 panels, and the load time (compilation
   and warm-up included).

Goals (issue #17): TIES within 1.5x of the floor and >= 2x faster than mergekit --cuda; >= 300
tokens/s per panel for a 135M model with compiled decoding. ``--tiny``: the same steps on tiny
models on the CPU, for a smoke test.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def run(command: list[str], what: str) -> None:
    started = time.perf_counter()
    print(f"-- {what}: {' '.join(command)}", file=sys.stderr, flush=True)
    subprocess.run(command, cwd=REPO, check=True)
    print(f"-- {what}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)


def chat_models(root: Path, tiny: bool) -> list[str]:
    from tests.support.families import build_family

    import torch

    shape = dict(hidden_size=64, num_layers=2) if tiny else dict(hidden_size=576, num_layers=30, intermediate_size=1536)
    family = build_family(root, "llama", 2, dtype=torch.bfloat16, vocab_size=512, seed=1, **shape)
    return [str(family.base), *map(str, family.finetuned)]


def merge_rows(data: dict) -> list[str]:
    rows, floor = [], (data.get("floor") or {}).get("wall_s")
    for result in data["results"]:
        ours, theirs = result["ours"], result["mergekit"]

        def cell(r: dict) -> str:
            if "wall_s" not in r:
                return r.get("error", "n/a")
            gpu = r.get("peak_gpu_gb")
            return f"{r['wall_s']:.1f} s, RSS {r['peak_rss_gb']:.1f} GB" + (f", GPU {gpu:.1f} GB" if gpu is not None else "")

        speed = f"{theirs['wall_s'] / ours['wall_s']:.2f}x" if "wall_s" in theirs and "wall_s" in ours else "n/a"
        over_floor = f"{ours['wall_s'] / floor:.2f}x" if floor and "wall_s" in ours else "n/a"
        rows.append(f"| merge {result['method']} | {cell(ours)} | {cell(theirs)} | {speed} | {over_floor} |")
    return rows


def chat_rows(data: dict, mode: str) -> list[str]:
    rows = [f"| chat, {mode} decoding, load + compile | {data['load_and_warm_up_s']:.0f} s | | | |"]
    for row in data["rows"]:
        per_panel = " / ".join(f"{r:.0f}" for r in row["per_panel_tok_s"])
        rows.append(f"| chat, {mode}, {row['panels']} panel(s), tokens/s per panel | {per_panel} | "
                    f"total {row['total_tok_s']:.0f} | | |")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU: a smoke test of every step")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "merge_studio_gpu_check")
    parser.add_argument("--skip-chat", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    device = "cpu" if args.tiny else "cuda"
    args.workdir.mkdir(parents=True, exist_ok=True)
    merges = args.workdir / "merges.json"
    run([sys.executable, "bench/merge_speed.py", "--size", "small" if args.tiny else "1b", "--device", device,
         "--methods", "ties,tsv" if args.tiny else "ties,linear,tsv,iso_c", "--floor", "--workdir", str(args.workdir / "merge"),
         "--json", str(merges), "--timeout", "240"], "merges")
    report = {"merges": json.loads(merges.read_text())}
    lines = ["| check | ours | mergekit --cuda | mergekit / ours (goal >= 2x) | ours / floor (goal <= 1.5x) |",
             "|---|---|---|---|---|", *merge_rows(report["merges"])]
    floor = report["merges"].get("floor") or {}
    if floor.get("wall_s"):
        lines.append(f"| read+write floor | {floor['wall_s']:.1f} s | | | |")
    if not args.skip_chat:
        models = chat_models(args.workdir / "chat-family", args.tiny)
        for mode in ("compiled", "dynamic"):
            out = args.workdir / f"chat-{mode}.json"
            run([sys.executable, "bench/chat_speed.py", "--device", device, "--decoding", mode, "--models", *models,
                 "--max-new-tokens", "16" if args.tiny else "128", "--repeats", "1" if args.tiny else "2",
                 "--json", str(out)], f"chat ({mode})")
            report[f"chat_{mode}"] = json.loads(out.read_text())
            lines += chat_rows(report[f"chat_{mode}"], mode)
    machine = report["merges"].get("machine", {})
    print(f"{machine.get('gpu') or machine.get('cpu') or device}; family "
          f"{report['merges']['family']['params_m']:.0f}M parameters x 4, bfloat16\n")
    print("\n".join(lines))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
