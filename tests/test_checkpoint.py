"""Checkpoint I/O: the lazy reader, the streaming writer, atomic output and cancellation."""

from __future__ import annotations

import json
import struct
import threading
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import assert_no_output, family, linear_recipe, load_model_tensors
from merging.checkpoint import (
    INDEX_NAME,
    CheckpointReader,
    StreamingWriter,
    TensorInfo,
    atomic_output,
)
from merging.engine import merge
from merging.errors import CheckpointError, MergeCancelled, MergeStudioError
from merging.recipe import load_recipe
from merging.units import parse_size


def _info(tensors: dict[str, torch.Tensor]) -> list[TensorInfo]:
    return [TensorInfo(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]


def write_all(folder: Path, tensors: dict[str, torch.Tensor], max_bytes: int = 10**9) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    writer = StreamingWriter(folder, _info(tensors), max_bytes)
    for name, tensor in tensors.items():
        writer.write(name, tensor)
    return writer.finish()


def assert_bit_exact(got: torch.Tensor, want: torch.Tensor, name: str = "") -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, name
    if want.numel():
        assert torch.equal(got.reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), name


def mixed_tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 1e-40, 3.4e38, -1.5])
    return {
        "a.float32": torch.cat([torch.randn(37, generator=gen), special]).reshape(4, 11),
        "b.bfloat16": torch.randn(8, 16, generator=gen).to(torch.bfloat16),
        "c.float16": torch.randn(3, 5, 7, generator=gen).half(),
        "d.float64": torch.randn(9, generator=gen, dtype=torch.float64),
        "e.int64": torch.tensor([0, 1, -1, 2**62, -(2**63), 2**63 - 1], dtype=torch.int64),
        "f.int32": torch.arange(-5, 6, dtype=torch.int32),
        "g.int8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "h.uint8": torch.tensor([0, 255, 7], dtype=torch.uint8),
        "i.bool": torch.tensor([[True, False, True], [False, False, True]]),
        "j.empty": torch.zeros(0, 4),
        "k.scalar": torch.tensor(2.5),
        "l.transposed": torch.randn(3, 5, generator=gen).t(),  # not contiguous
    }


# -- reading ---------------------------------------------------------------------------------

def test_reader_single_file_matches_load_file():
    folder = family("llama", 2).finetuned[0]
    want = load_file(folder / "model.safetensors")
    reader = CheckpointReader(folder)
    assert sorted(reader.names()) == sorted(want)
    for name, tensor in want.items():
        assert name in reader
        assert reader.info(name) == TensorInfo(name, tuple(tensor.shape), tensor.dtype)
        assert_bit_exact(reader.get(name), tensor, name)
    reader.close()


def test_reader_sharded_folder_matches_load_file():
    folder = family("llama", 1, shard_size="100KB").finetuned[0]
    index = json.loads((folder / INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    want = {}
    for shard in shards:
        want.update(load_file(folder / shard))
    reader = CheckpointReader(folder)
    assert sorted(reader.names()) == sorted(want) == sorted(index["weight_map"])
    for name, tensor in want.items():
        assert_bit_exact(reader.get(name), tensor, name)


def test_reader_refuses_missing_shard(tmp_path):
    import shutil

    folder = shutil.copytree(family("llama", 1, shard_size="100KB").finetuned[0], tmp_path / "m")
    index = json.loads((folder / INDEX_NAME).read_text())
    lost = sorted(set(index["weight_map"].values()))[-1]
    (folder / lost).unlink()
    with pytest.raises(CheckpointError, match=lost):
        CheckpointReader(folder)


def test_reader_reads_what_the_writer_wrote(tmp_path):
    tensors = mixed_tensors()
    write_all(tmp_path / "out", tensors, max_bytes=200)
    reader = CheckpointReader(tmp_path / "out")
    assert sorted(reader.names()) == sorted(tensors)
    for name, tensor in tensors.items():
        assert_bit_exact(reader.get(name), tensor, name)


# -- writing ---------------------------------------------------------------------------------

def test_single_shard_loads_with_safetensors(tmp_path):
    tensors = mixed_tensors()
    files = write_all(tmp_path / "out", tensors)
    assert [f.name for f in files] == ["model.safetensors"]
    assert not (tmp_path / "out" / INDEX_NAME).exists()

    loaded = load_file(files[0])
    assert sorted(loaded) == sorted(tensors)
    for name, tensor in tensors.items():
        assert_bit_exact(loaded[name], tensor, name)

    with safe_open(str(files[0]), framework="pt") as handle:
        assert handle.metadata() == {"format": "pt"}
        assert sorted(handle.keys()) == sorted(tensors)
        for name, tensor in tensors.items():
            assert_bit_exact(handle.get_tensor(name), tensor, name)
            assert handle.get_slice(name).get_shape() == list(tensor.shape)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.int64, torch.bool])
def test_dtypes_round_trip_bit_exactly(tmp_path, dtype):
    gen = torch.Generator().manual_seed(1)
    if dtype == torch.bool:
        tensor = torch.rand(33, 7, generator=gen) > 0.5
    elif dtype.is_floating_point:
        tensor = (torch.randn(33, 7, generator=gen) * 1e3).to(dtype)
        tensor[0, :4] = torch.tensor([float("nan"), float("inf"), -0.0, torch.finfo(dtype).tiny])
    else:
        tensor = torch.randint(-(2**62), 2**62, (33, 7), generator=gen, dtype=dtype)
    files = write_all(tmp_path / "out", {"t": tensor})
    assert_bit_exact(load_file(files[0])["t"], tensor)
    assert_bit_exact(CheckpointReader(tmp_path / "out").get("t"), tensor)


def test_zero_element_tensor(tmp_path):
    tensors = {"before": torch.ones(3), "empty": torch.zeros(0, 16, dtype=torch.bfloat16), "after": torch.arange(4.0)}
    files = write_all(tmp_path / "out", tensors)
    loaded = load_file(files[0])
    assert loaded["empty"].shape == (0, 16) and loaded["empty"].dtype == torch.bfloat16
    assert torch.equal(loaded["before"], tensors["before"])
    assert torch.equal(loaded["after"], tensors["after"])


def test_sharding_honours_the_max_size(tmp_path):
    gen = torch.Generator().manual_seed(2)
    tensors = {f"layer.{i}.weight": torch.randn(10 + i, 30, generator=gen) for i in range(12)}
    tensors["big"] = torch.randn(200, 30, generator=gen)  # 24 000 bytes: larger than a shard
    tensors["flag"] = torch.tensor([True, False])
    max_bytes = 4000
    folder = tmp_path / "out"
    files = write_all(folder, tensors, max_bytes=max_bytes)

    assert len(files) > 3
    assert [f.name for f in files] == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    index = json.loads((folder / INDEX_NAME).read_text())
    assert index["weight_map"].keys() == tensors.keys()
    assert set(index["weight_map"].values()) == {f.name for f in files}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())

    seen = {}
    for file in files:
        shard = load_file(file)
        data = sum(t.numel() * t.element_size() for t in shard.values())
        assert data <= max_bytes or len(shard) == 1, (file.name, data)
        for name, tensor in shard.items():
            assert index["weight_map"][name] == file.name
            seen[name] = tensor
    assert seen.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert_bit_exact(seen[name], tensor, name)


def test_writer_rejects_out_of_plan_writes(tmp_path):
    tensors = {"a": torch.zeros(2), "b": torch.zeros(3)}
    writer = StreamingWriter(tmp_path, _info(tensors), 10**9)
    with pytest.raises(RuntimeError, match="order"):
        writer.write("b", tensors["b"])
    with pytest.raises(RuntimeError, match="plan"):
        writer.write("a", torch.zeros(5))
    writer.write("a", tensors["a"])
    with pytest.raises(RuntimeError, match="1 of 2"):
        writer.finish()
    writer.abort()


@pytest.mark.parametrize("text, size", [("2GB", 2 * 10**9), ("500MB", 5 * 10**8), ("20KB", 20_000),
                                        ("1.5GiB", int(1.5 * 2**30)), ("4096", 4096), (123, 123)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "-5MB", "0", "2XB"])
def test_parse_size_rejects(text):
    with pytest.raises(MergeStudioError, match="size"):
        parse_size(text)


# -- atomic output ---------------------------------------------------------------------------

@pytest.mark.parametrize("error", [ValueError, KeyboardInterrupt])
def test_atomic_output_leaves_nothing_on_failure(tmp_path, error):
    out = tmp_path / "merged"
    with pytest.raises(error):
        with atomic_output(out, overwrite=False, protected=[]) as temp:
            assert temp.parent == tmp_path and temp.name.startswith(".merged.partial-")
            (temp / "model.safetensors").write_bytes(b"half a model")
            raise error()
    assert_no_output(out)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_atomic_output_keeps_existing_folder_on_failure(tmp_path, error):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(error):
        with atomic_output(out, overwrite=True, protected=[]) as temp:
            (temp / "new.txt").write_text("new")
            raise error()
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_atomic_output_replaces_existing_folder_on_success(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with atomic_output(out, overwrite=True, protected=[]) as temp:
        (temp / "new.txt").write_text("new")
        assert (out / "old.txt").exists()  # untouched until the block succeeds
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


def test_atomic_output_refuses_existing_without_overwrite(tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    with pytest.raises(CheckpointError, match="--overwrite"):
        with atomic_output(out, overwrite=False, protected=[]):
            pytest.fail("the body must not run")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


@pytest.mark.parametrize("relation", ["same", "inside", "parent"])
def test_atomic_output_refuses_protected_folders(tmp_path, relation):
    source = tmp_path / "models" / "source"
    source.mkdir(parents=True)
    (source / "config.json").write_text("{}")
    out = {"same": source, "inside": source / "sub" / "merged", "parent": tmp_path / "models"}[relation]
    with pytest.raises(CheckpointError, match="overlaps"):
        with atomic_output(out, overwrite=True, protected=[source]):
            pytest.fail("the body must not run")
    assert sorted(p.name for p in source.iterdir()) == ["config.json"]


def test_atomic_output_refuses_a_symlink_into_a_source(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    (tmp_path / "alias").symlink_to(source)
    with pytest.raises(CheckpointError, match="overlaps"):
        with atomic_output(tmp_path / "alias" / "merged", overwrite=False, protected=[source]):
            pytest.fail("the body must not run")


# -- cancellation ----------------------------------------------------------------------------

def test_cancel_during_merge_leaves_nothing(tmp_path):
    fam = family("llama", 2)
    recipe = load_recipe({**linear_recipe(*fam.finetuned), "base_model": str(fam.base)})
    out = tmp_path / "merged"
    cancel = threading.Event()
    calls = []

    def progress(done, total, name):
        calls.append(done)
        if done == 3:
            cancel.set()

    with pytest.raises(MergeCancelled):
        merge(recipe, out, device="cpu", progress=progress, cancel=cancel)
    assert calls == [1, 2, 3]
    assert_no_output(out)
    assert list(tmp_path.iterdir()) == []


def test_merge_through_the_api_writes_a_loadable_folder(tmp_path):
    """The uncancelled twin of the test above, so its 'nothing left' is not vacuous."""
    fam = family("llama", 2)
    out = tmp_path / "merged"
    result = merge(load_recipe(linear_recipe(*fam.finetuned)), out, device="cpu", cancel=threading.Event())
    assert result.output == out and result.shards == 1
    merged = load_model_tensors(out)
    a, b = load_file(fam.finetuned[0] / "model.safetensors"), load_file(fam.finetuned[1] / "model.safetensors")
    assert merged.keys() == a.keys()
    for name in a:
        torch.testing.assert_close(merged[name], (a[name] + b[name]) / 2, rtol=0, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]


# -- damaged and crafted files ---------------------------------------------------------------

def _raw_safetensors(path: Path, header: dict | bytes, data: bytes, declared_len: int | None = None) -> None:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    length = len(raw) if declared_len is None else declared_len
    path.write_bytes(struct.pack("<Q", length) + raw + data)


CRAFTED = {
    "header-longer-than-file": ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, 10**6),
    "header-not-json": (b"{not json", b"", None),
    "header-not-object": (b"[1, 2, 3]", b"", None),
    "unknown-dtype": ({"t": {"dtype": "F8_E4M3X", "shape": [1], "data_offsets": [0, 1]}}, b"\0", None),
    "dtype-not-a-string": ({"t": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, None),
    "negative-dim": ({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None),
    "outside-the-file": ({"t": {"dtype": "F32", "shape": [100], "data_offsets": [0, 400]}}, b"\0" * 16, None),
    "shape-disagrees-with-offsets": ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 16]}}, b"\0" * 16, None),
    "overlapping-tensors": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                             "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, None),
    "description-not-object": ({"t": "F32"}, b"", None),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_reader_rejects_crafted_headers(tmp_path, case):
    header, data, declared = CRAFTED[case]
    folder = tmp_path / "model"
    folder.mkdir()
    _raw_safetensors(folder / "model.safetensors", header, data, declared)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        reader = CheckpointReader(folder, label="crafted")
        for name in reader.names():
            reader.get(name)


def test_reader_reports_a_file_that_shrinks_after_opening(tmp_path):
    folder = tmp_path / "model"
    write_all(folder, {"a": torch.arange(1000.0), "b": torch.arange(1000.0)})
    reader = CheckpointReader(folder)
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])  # same inode's size changes under the reader
    assert torch.equal(reader.get("a"), torch.arange(1000.0))
    with pytest.raises(CheckpointError, match="tensor b"):
        reader.get("b")
    reader.close()
