"""Fold a LoRA adapter into the base: an expert checkpoint that loads with from_pretrained."""

from __future__ import annotations

from pathlib import Path

from demo.lora import adapter_deltas
from merging.checkpoint import (
    CheckpointReader,
    StreamingWriter,
    atomic_output,
    copy_support_files,
)
from merging.errors import MergeStudioError


def build_expert(base: Path, adapter: Path, folder: Path, digest: str, stamp_name: str) -> Path:
    """Write base + ΔW (float32) to ``folder`` atomically, stamped with the adapter's digest."""
    deltas = adapter_deltas(adapter)
    reader = CheckpointReader(base)
    try:
        missing = sorted(set(deltas) - set(reader.names()))
        if missing:
            raise MergeStudioError(f"adapter {adapter.name} targets {missing[0]}, which the base does not have")
        infos = [reader.info(name) for name in reader.names()]
        with atomic_output(folder, overwrite=True, protected=[base]) as temp:
            writer = StreamingWriter(temp, infos, max_shard_bytes=2 * 10**9)
            try:
                for info in infos:
                    tensor = reader.get(info.name)
                    if info.name in deltas:
                        tensor = (tensor.float() + deltas[info.name]).to(info.dtype)
                    writer.write(info.name, tensor)
                writer.finish()
            finally:
                writer.abort()
            copy_support_files(base, base, temp, None)
            (temp / stamp_name).write_text(digest)
    finally:
        reader.close()
    return folder
