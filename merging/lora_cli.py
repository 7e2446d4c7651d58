"""``python -m merging extract-lora MERGED BASE OUT --rank R``: a merged model as a PEFT LoRA adapter
on its base (``merging.lora_export``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from merging.cli import Command
from merging.lora_export import extract_lora
from merging.sources import SourcePolicy


def _arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("merged", help="the merged model: a local folder or a Hub id org/name[@revision]")
    parser.add_argument("base", help="the base it was merged from (the adapter is applied to it)")
    parser.add_argument("out_dir", type=Path, help="adapter folder to write (must not exist unless --overwrite)")
    parser.add_argument("--rank", type=int, required=True,
                        help="LoRA rank r (a layer narrower than r gets its full rank: exact)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda: where the SVDs run")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing adapter folder")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="also read pytorch_model.bin checkpoints (torch.load weights_only=True); only for trusted files")
    parser.add_argument("--json", action="store_true", help="print the summary (size, errors per layer, left out) as JSON")


def cmd_extract_lora(args) -> int:
    result = extract_lora(args.merged, args.base, args.out_dir, args.rank, device=args.device,
                          overwrite=args.overwrite, policy=SourcePolicy(allow_pickle=args.allow_pickle))
    print(json.dumps(result.summary()) if args.json else f"{result.describe()} -> {result.output}")
    return 0


EXTRACT_LORA = Command("extract-lora", "write a merged model as a PEFT LoRA adapter on its base (truncated SVD of "
                       "merged − base per linear layer)", _arguments, cmd_extract_lora, "no adapter folder was written")
