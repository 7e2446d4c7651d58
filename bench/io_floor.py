#!/usr/bin/env python
"""The read+write floor of a merge: read every tensor of every model a recipe names (to the
device) and write one output checkpoint the size of the base, with nothing computed.

No merge can be faster than this on the same machine; ``bench/merge_speed.py --floor`` times it
beside the merges (``bench/gpu_check.sh``'s goal: TIES within 1.5x of it).

    python bench/io_floor.py RECIPE OUT [--device cuda]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    recipe = yaml.safe_load(args.recipe.read_text())
    models = [recipe["base_model"], *[entry["model"] for entry in recipe["models"]]]
    models = list(dict.fromkeys(str(m) for m in models if m))
    output: dict[str, torch.Tensor] = {}
    for index, folder in enumerate(models):
        for path in sorted(Path(folder).glob("*.safetensors")):
            with safe_open(str(path), framework="pt", device=args.device) as reader:
                for name in reader.keys():
                    tensor = reader.get_tensor(name)
                    if index == 0:  # the output: the base's tensors, back on the CPU to be written
                        output[name] = tensor.to("cpu", copy=True)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(output, str(args.out / "model.safetensors"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
