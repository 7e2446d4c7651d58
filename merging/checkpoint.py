"""Checkpoint I/O: a lazy reader over safetensors folders and a streaming, atomic writer.

Reading hands out one tensor at a time by name, read with ``preadv`` into memory the caller
owns (nothing else is loaded, and no memory map keeps pages of merged tensors resident).
Writing lays out every shard up front from the planned names, shapes and dtypes, writes each
shard's safetensors header first and then streams tensor bytes straight into place, so the
writer holds no tensors at all. The output folder appears only when complete: everything goes
to a hidden temporary sibling that is renamed at the end and deleted on any failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from merging.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"
PICKLE_INDEX_NAME = "pytorch_model.bin.index.json"
CONFIG_FILES = ("config.json", "generation_config.json")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "vocab.txt",
    "chat_template.jinja", "chat_template.json",
)

_SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
_FROM_SAFETENSORS = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit; a larger header is hostile or corrupt


@dataclass(frozen=True)
class _Entry:
    """Where one tensor's bytes lie in its file."""

    path: Path
    start: int  # absolute file offset
    info: TensorInfo


def read_safetensors_header(path: Path, label: str) -> list[_Entry]:
    """Parse and check a safetensors header without reading (or allocating) any tensor data.

    Every declared tensor must have a known dtype, a shape whose byte size equals its offsets'
    span, and lie inside the file without overlapping another, so a crafted header cannot make
    us allocate or read more than the file holds.
    """

    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(
            f"{label}: {path.name} is not a valid safetensors file ({why}); the file is corrupt or "
            "truncated: download or save it again"
        )

    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise corrupt("shorter than its 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise corrupt(f"declares a {header_len}-byte header in a {size}-byte file")
            raw = handle.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{label}: cannot read {path.name}: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise corrupt("its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise corrupt("its header is not a JSON object")
    data_start = 8 + header_len
    data_size = size - data_start
    entries = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(meta, dict):
            raise corrupt(f"tensor {name!r} has no description")
        raw_dtype = meta.get("dtype")
        dtype = _FROM_SAFETENSORS.get(raw_dtype) if isinstance(raw_dtype, str) else None
        shape, offsets = meta.get("shape"), meta.get("data_offsets")
        if dtype is None:
            raise corrupt(f"tensor {name!r} has unsupported dtype {meta.get('dtype')!r}")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise corrupt(f"tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise corrupt(f"tensor {name!r} has invalid data_offsets {offsets!r}")
        info = TensorInfo(name, tuple(shape), dtype)
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise corrupt(f"tensor {name!r} lies outside the file (bytes {begin}-{end} of {data_size})")
        if end - begin != info.nbytes:
            raise corrupt(f"tensor {name!r} declares shape {shape} ({info.nbytes} bytes) but spans {end - begin} bytes")
        entries.append(_Entry(path, data_start + begin, info))
    previous_end, previous = data_start, None
    for entry in sorted(entries, key=lambda e: e.start):
        if entry.start < previous_end:
            raise corrupt(f"tensors {previous!r} and {entry.info.name!r} overlap")
        previous_end, previous = entry.start + entry.info.nbytes, entry.info.name
    return entries


class CheckpointReader:
    """Lazy access to the tensors of one model folder.

    Safetensors files (single or sharded with an index) are indexed from their checked headers;
    a tensor's bytes are read only when asked for, straight into a fresh buffer with ``preadv``
    (no memory map, so pages of tensors already merged do not linger in the process's memory,
    and reads from several threads need no locking). Pickle checkpoints (``pytorch_model.bin``)
    are read only when ``allow_pickle`` is set, with ``torch.load(weights_only=True)`` so no
    code runs.
    """

    def __init__(self, folder: Path, *, allow_pickle: bool = False, label: str | None = None,
                 files: list[Path] | None = None):
        """``files``: read exactly these weight files (``*.safetensors``, or pickles), not the folder's
        checkpoint (a LoRA adapter's ``adapter_model.safetensors``)."""
        self.folder = Path(folder)
        self.label = label or str(folder)
        self._entries: dict[str, _Entry] = {}
        self._fds: dict[Path, int] = {}
        self._pickled: dict[str, torch.Tensor] = {}
        chosen = [Path(f) for f in files] if files is not None else None
        safe = safetensors_files(self.folder) if chosen is None else [f for f in chosen if f.suffix == ".safetensors"]
        pickles = pickle_files(self.folder) if chosen is None else [f for f in chosen if f.suffix != ".safetensors"]
        if safe:
            for path in safe:
                for entry in read_safetensors_header(path, self.label):
                    self._entries[entry.info.name] = entry
        elif pickles:
            if not allow_pickle:
                raise CheckpointError(pickle_refusal(self.label))
            self._load_pickles(pickles)
        else:
            raise CheckpointError(f"{self.label}: no weights found (no *.safetensors files); is this a model folder?")

    def _load_pickles(self, files: list[Path]) -> None:
        for path in files:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises many types for bad pickles
                raise CheckpointError(f"{self.label}: cannot read {path.name} safely: {exc}") from None
            if not isinstance(state, dict):
                raise CheckpointError(f"{self.label}: {path.name} does not hold a state dict of tensors")
            for name, tensor in state.items():
                if isinstance(tensor, torch.Tensor):
                    self._pickled[name] = tensor

    def names(self) -> list[str]:
        return list(self._pickled or self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries or name in self._pickled

    def info(self, name: str) -> TensorInfo:
        if name in self._pickled:
            tensor = self._pickled[name]
            return TensorInfo(name, tuple(tensor.shape), tensor.dtype)
        return self._entries[name].info

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into new memory owned by the caller."""
        if name in self._pickled:
            return self._pickled[name]
        entry = self._entries[name]
        info = entry.info
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)
        if info.nbytes:
            try:
                fd = self._fds.get(entry.path)
                if fd is None:
                    fd = self._fds[entry.path] = os.open(entry.path, os.O_RDONLY)
                view = memoryview(buffer.numpy())
                done = 0
                while done < info.nbytes:
                    count = os.preadv(fd, [view[done:]], entry.start + done)
                    if count == 0:
                        raise OSError(f"file ends early at byte {entry.start + done}")
                    done += count
            except OSError as exc:
                raise CheckpointError(f"{self.label}: cannot read tensor {name} from {entry.path.name}: {exc}") from None
        return buffer.view(info.dtype).reshape(info.shape)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._pickled.clear()


def all_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf anywhere: a float32 sum is non-finite if any entry is (checked fully only then)."""
    if not tensor.is_floating_point():
        return True
    return bool(torch.isfinite(tensor.sum(dtype=torch.float32))) or bool(torch.isfinite(tensor).all())


def damaged_source(name: str, sources: list[tuple[str, torch.Tensor]]) -> str | None:
    """The message for the first of ``sources`` ((label, tensor) pairs) whose tensor ``name`` holds
    NaN or Inf, or None when all are finite."""
    for label, tensor in sources:
        if not all_finite(tensor):
            return (f"tensor {name} of {label} contains NaN or Inf values; the checkpoint is damaged "
                    "(or overflowed in a lower precision): fix or re-export that model")
    return None


def safetensors_files(folder: Path) -> list[Path]:
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{folder}: {INDEX_NAME} is not a valid index (no weight_map)") from None
        files = sorted({folder / name for name in weight_map.values()})
        missing = [p.name for p in files if not p.is_file()]
        if missing:
            raise CheckpointError(f"{folder}: shard {missing[0]} named in {INDEX_NAME} is missing; download it again")
        return files
    return sorted(folder.glob("*.safetensors"))


def pickle_files(folder: Path) -> list[Path]:
    index = folder / PICKLE_INDEX_NAME
    if index.is_file():
        try:
            return sorted({folder / n for n in json.loads(index.read_text())["weight_map"].values()})
        except (ValueError, KeyError, TypeError):
            raise CheckpointError(f"{folder}: {PICKLE_INDEX_NAME} is not a valid index") from None
    return sorted(folder.glob("pytorch_model*.bin"))


def pickle_refusal(label: str) -> str:
    return (
        f"{label} has only pickle weights (pytorch_model.bin). Pickle files can run arbitrary code "
        "when loaded, so only safetensors are read by default. Convert it to safetensors, or, if you "
        "trust its source, pass --allow-pickle (it is then read with torch.load(weights_only=True))."
    )


# -- writing -------------------------------------------------------------------------------

@dataclass
class _Shard:
    path: Path
    tensors: list[TensorInfo]
    offsets: dict[str, tuple[int, int]]
    header: bytes


def plan_shards(tensors: list[TensorInfo], max_bytes: int) -> list[list[TensorInfo]]:
    """Greedy shards in the given order; a tensor larger than the limit gets a shard of its own."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for info in tensors:
        if shards[-1] and size + info.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return shards


class StreamingWriter:
    """Writes planned tensors into safetensors shards as they arrive, holding none of them.

    ``write`` must be called in plan order. Each shard's header (names, dtypes, shapes,
    offsets) is written when the shard is started; tensor bytes follow in place.
    """

    def __init__(self, folder: Path, tensors: list[TensorInfo], max_shard_bytes: int):
        self.folder = folder
        groups = plan_shards(tensors, max_shard_bytes)
        count = len(groups)
        self._shards = [self._layout(group, i, count) for i, group in enumerate(groups)]
        self._order = [info.name for info in tensors]
        self._planned = {info.name: info for info in tensors}
        self._position = 0
        self._shard_index = -1
        self._file = None

    @staticmethod
    def _layout(group: list[TensorInfo], index: int, count: int) -> _Shard:
        name = "model.safetensors" if count == 1 else f"model-{index + 1:05d}-of-{count:05d}.safetensors"
        offsets, header, start = {}, {}, 0
        for info in group:
            offsets[info.name] = (start, start + info.nbytes)
            header[info.name] = {
                "dtype": _SAFETENSORS_DTYPES[info.dtype],
                "shape": list(info.shape),
                "data_offsets": [start, start + info.nbytes],
            }
            start += info.nbytes
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
        return _Shard(Path(name), group, offsets, raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self._order[self._position]
        if name != expected:
            raise RuntimeError(f"tensor {name} written out of plan order (expected {expected})")
        if self._file is None or name not in self._shards[self._shard_index].offsets:
            self._next_shard()
        info = self._planned[name]
        data = tensor.detach().to("cpu").contiguous()
        if tuple(data.shape) != info.shape or data.dtype != info.dtype:
            raise RuntimeError(f"tensor {name} does not match its plan {info}")
        self._file.write(data.reshape(-1).view(torch.uint8).numpy().data if data.numel() else b"")
        self._position += 1

    def _next_shard(self) -> None:
        self._close_file()
        self._shard_index += 1
        shard = self._shards[self._shard_index]
        self._file = open(self.folder / shard.path, "wb")
        self._file.write(struct.pack("<Q", len(shard.header)))
        self._file.write(shard.header)

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    def finish(self) -> list[Path]:
        if self._position != len(self._order):
            raise RuntimeError(f"only {self._position} of {len(self._order)} planned tensors were written")
        self._close_file()
        if len(self._shards) > 1:
            total = sum(info.nbytes for shard in self._shards for info in shard.tensors)
            index = {
                "metadata": {"total_size": total},
                "weight_map": {info.name: str(s.path) for s in self._shards for info in s.tensors},
            }
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return [self.folder / s.path for s in self._shards]

    def abort(self) -> None:
        """Close the open shard after a failure; its folder is about to be deleted."""
        if self._file is not None:
            try:
                self._file.close()  # flushing may fail again (disk full): the first error matters
            except OSError:
                pass
            finally:
                self._file = None


def check_output_dir(out_dir: Path, *, overwrite: bool) -> None:
    """Refuse an existing output folder (unless ``overwrite``) or a file in its place."""
    out_dir = Path(out_dir).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"output path {out_dir} exists and is not a folder")
    if out_dir.exists() and not overwrite:
        raise CheckpointError(f"output folder {out_dir} already exists; choose another or pass --overwrite to replace it")


def write_text_atomically(path: Path, text: str) -> Path:
    """``text`` into ``path`` through a temporary sibling renamed into place: a reader sees the
    old file or the new one, never half of it, and a failure leaves no temporary behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}-{uuid.uuid4().hex}.tmp")
    try:
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


@contextmanager
def atomic_output(out_dir: Path, *, overwrite: bool, protected: list[Path]) -> Iterator[Path]:
    """Yield a temporary sibling folder that becomes ``out_dir`` only if the block succeeds.

    Refuses an existing ``out_dir`` unless ``overwrite``, and any ``out_dir`` that is, contains
    or lies inside one of the ``protected`` source folders. On any exception (including
    cancellation) the temporary folder is removed and ``out_dir`` is left as it was.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    target = out_dir.resolve()
    for source in protected:
        source = source.resolve()
        if target == source or source in target.parents or target in source.parents:
            raise CheckpointError(
                f"output folder {out_dir} overlaps the source model folder {source}; "
                "choose an output folder outside every source so no source is ever written"
            )
    check_output_dir(out_dir, overwrite=overwrite)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise CheckpointError(f"cannot create output folder {out_dir}: a file is in the way on its path") from None
    except OSError as exc:
        raise CheckpointError(f"cannot create {out_dir.parent}: {exc.strerror or exc}") from None
    remove_stale_partials(out_dir)
    token = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temp = out_dir.parent / f".{out_dir.name}.partial-{token}"
    temp.mkdir()
    try:
        yield temp
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{token}"
            out_dir.rename(old)
            temp.rename(out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            temp.rename(out_dir)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def remove_stale_partials(out_dir: Path) -> None:
    """Delete what a killed earlier run left beside ``out_dir``: temporary folders named
    ``.<name>.partial-<pid>-<token>`` (or ``.old-``) whose process no longer exists."""
    pattern = re.compile(rf"^\.{re.escape(out_dir.name)}\.(?:partial|old)-(\d+)-[0-9a-f]+$")
    try:
        siblings = list(out_dir.parent.iterdir())
    except OSError:
        return
    for sibling in siblings:
        match = pattern.match(sibling.name)
        if match and sibling.is_dir() and not process_alive(int(match.group(1))):
            shutil.rmtree(sibling, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether a process with this id exists (ours counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def copy_support_files(source: Path, tokenizer_source: Path | None, out_dir: Path, dtype: torch.dtype | None,
                       config_updates: dict | None = None) -> None:
    """Copy config and generation config from ``source`` and tokenizer files from ``tokenizer_source``
    (None: the caller writes the tokenizer).

    The config's dtype is set to the dtype actually written, so ``from_pretrained`` with
    ``dtype="auto"`` loads what is on disk; ``config_updates`` (e.g. a frankenmerge's number of
    layers) are written over the copied config.
    """
    for name in CONFIG_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out_dir / name)
    if (dtype is not None or config_updates) and (out_dir / "config.json").is_file():
        config = json.loads((out_dir / "config.json").read_text())
        if dtype is not None:
            dtype_name = str(dtype).removeprefix("torch.")
            config["dtype"] = dtype_name
            if "torch_dtype" in config:
                config["torch_dtype"] = dtype_name
        config.update(config_updates or {})
        (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    for name in TOKENIZER_FILES if tokenizer_source is not None else ():
        if (tokenizer_source / name).is_file():
            shutil.copyfile(tokenizer_source / name, out_dir / name)
