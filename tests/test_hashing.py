"""Content ids (``_hashing``): the same content gives the same id however it is handed over,
any changed byte, shape or dtype gives another, and reading versions imports nothing."""

from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from pytest_diffeval import _hashing
from pytest_diffeval._hashing import (
    _CHUNK,
    digest_array,
    digest_bytes,
    digest_file,
    digest_files,
    digest_json,
    digest_stream,
    digest_text,
    library_versions,
)


def test_same_bytes_same_id_one_changed_byte_another() -> None:
    data = bytes(range(256)) * 4
    changed = bytearray(data)
    changed[500] ^= 1
    assert digest_bytes(data) == digest_bytes(bytes(data)) and len(digest_bytes(data)) == 64
    assert digest_bytes(bytes(changed)) != digest_bytes(data)
    assert digest_bytes(data, 12) == digest_bytes(data)[:12]
    assert digest_text("café") == digest_bytes("café".encode())


def test_a_stream_is_the_digest_of_its_concatenation() -> None:
    parts = [b"abc", memoryview(b"def"), np.arange(5, dtype=np.uint8)]
    assert digest_stream(parts, 20) == digest_bytes(b"abcdef" + bytes(range(5)), 20)
    assert digest_stream(iter([])) == digest_bytes(b"")


def test_json_ids_ignore_key_order_and_use_repr_for_the_rest() -> None:
    assert digest_json({"a": 1, "b": [2, 3]}) == digest_json({"b": [2, 3], "a": 1})
    assert digest_json({"a": 1}) != digest_json({"a": 2})
    assert len(digest_json({"a": 1})) == 32
    assert digest_json({"p": Path("x")}) == digest_text(json.dumps({"p": repr(Path("x"))}), 32)
    with pytest.raises(TypeError):
        digest_json({"p": Path("x")}, default=None)  # callers that must not key on repr say so


def test_digest_file_reads_in_chunks_and_equals_the_bytes_digest(tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 256, _CHUNK * 2 + 123, dtype=np.uint8).tobytes()
    file = tmp_path / "weights.bin"
    file.write_bytes(data)
    assert len(data) > _CHUNK
    assert digest_file(file) == digest_bytes(data)
    assert digest_file(file, 16) == digest_bytes(data, 16)
    file.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # the last byte, in the last chunk
    assert digest_file(file) != digest_bytes(data)


def test_digest_files_counts_names_content_and_missing_files(tmp_path: Path) -> None:
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n")
    b.write_text("y = 2\n")
    both = digest_files([a, b])
    assert digest_files([a, b]) == both and len(both) == 16
    b.write_text("y = 3\n")
    assert digest_files([a, b]) != both
    renamed = tmp_path / "c.py"
    b.rename(renamed)
    renamed.write_text("y = 2\n")
    assert digest_files([a, renamed]) != both  # same bytes under another name
    assert digest_files([a, b]) != digest_files([a])  # b is missing now: counts as "-"


def test_array_ids_follow_bytes_shape_and_dtype() -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    same = array.copy()
    assert digest_array(array) == digest_array(same)
    assert digest_array(array).startswith("array:uint8:(2, 3, 4):")
    changed = array.copy()
    changed[1, 2, 3] += 1
    assert digest_array(changed) != digest_array(array)
    assert digest_array(array.reshape(4, 3, 2)) != digest_array(array)  # same bytes, other shape
    assert digest_array(array.view(np.int8)) != digest_array(array)  # same bytes, other dtype
    assert digest_array(array, 40).endswith(digest_bytes(array.tobytes(), 40))


def test_arrays_are_hashed_by_content_in_any_memory_layout() -> None:
    array = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    transposed = array.transpose(2, 0, 1)  # not contiguous: hashed in C order, as tobytes() reads it
    assert digest_array(transposed) == digest_array(np.ascontiguousarray(transposed))
    one = np.arange(12, dtype=np.uint8).reshape(1, 3, 4)
    broadcast = np.broadcast_to(one, (5, 3, 4))  # one input image for five samples: stride 0
    assert broadcast.strides[0] == 0
    assert digest_array(broadcast) == digest_array(np.repeat(one, 5, axis=0))
    assert digest_array(broadcast) != digest_array(np.broadcast_to(one, (4, 3, 4)))


def test_arrays_are_hashed_without_a_copy() -> None:
    """An image set of a few hundred MiB is keyed without a second copy of its pixels
    (docs/speed.md, figure 6), a broadcast one without materialising it."""
    big = np.ones((64, 1024, 1024), dtype=np.uint8)  # 64 MiB
    broadcast = np.broadcast_to(big[:1], (64, 1024, 1024))
    for array in (big, broadcast):
        tracemalloc.start()
        try:
            digest_array(array)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 8 * 2**20, f"hashing a {array.nbytes >> 20} MiB array allocated {peak >> 20} MiB"


def test_library_versions_reads_metadata_without_importing_the_libraries() -> None:
    code = ("import sys; from pytest_diffeval._hashing import library_versions; v = library_versions(); "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers', 'torchmetrics') if m in sys.modules)); "
            "print(v['torch'] != '-' and v['pytest_diffeval'] != '')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split("\n")[:2] == ["[]", "True"], done.stdout + done.stderr
    versions = library_versions()
    assert set(_hashing.LIBRARIES) <= set(versions) and {"pytest_diffeval", "python"} <= set(versions)
    assert library_versions() is versions  # computed once per process
