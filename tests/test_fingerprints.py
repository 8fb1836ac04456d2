"""Content identity of model folders and files (fingerprints.py): a weights file replaced by
one of the same size and mtime (``touch -r``) is another model, in this process, in the
next session and in the provenance memo that lets a warm rerun skip loading; a warm session
reads no bytes; a memo entry that is not the one asked for is a miss."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import pytest

from pytest_diffeval import fingerprints, settings
from pytest_diffeval.fingerprints import file_fingerprint, model_fingerprint
from pytest_diffeval.planning import ProvenanceMemo

SETTLE_S = 0.06  # longer than the patched RACY_NS: files older than this are remembered


@pytest.fixture
def memo_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache dir for the on-disk memo, a short racy window, and a fresh process memo."""
    previous = settings.current()
    settings.configure(cache_dir=tmp_path / "cache", result_cache=True)
    monkeypatch.setattr(fingerprints, "RACY_NS", 30_000_000)
    monkeypatch.setattr(fingerprints, "_MEMO", {})
    yield tmp_path / "cache" / "fingerprints"
    settings.configure(cache_dir=previous.cache_dir, result_cache=previous.result_cache)


def model_folder(root: Path, seed: int = 0) -> Path:
    (root / "unet").mkdir(parents=True)
    (root / "model_index.json").write_text('{"_class_name": "X"}')
    (root / "unet" / "weights.safetensors").write_bytes(hashlib.sha256(str(seed).encode()).digest() * 2048)
    return root


def replace_keeping_size_and_mtime(file: Path, data: bytes) -> None:
    """What ``cp new file && touch -r old file`` does: new bytes, old size and times."""
    stat = file.stat()
    assert len(data) == stat.st_size
    file.write_bytes(data)
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (file.stat().st_size, file.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)


def regressed(file: Path) -> bytes:
    data = bytearray(file.read_bytes())
    data[100] ^= 0xFF  # one flipped byte: same size
    return bytes(data)


def test_a_weights_file_replaced_with_the_same_size_and_mtime_is_another_model(memo_dir: Path, tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "model")
    weights = folder / "unet" / "weights.safetensors"
    time.sleep(SETTLE_S)
    before = model_fingerprint(folder)
    before_file = file_fingerprint(weights)

    replace_keeping_size_and_mtime(weights, regressed(weights))
    time.sleep(SETTLE_S)
    after = model_fingerprint(folder)  # the same process: its memo must not be fooled either
    assert after != before and file_fingerprint(weights) != before_file
    assert len(list(memo_dir.rglob("*.json"))) == 4  # remembered on disk: folder and file, before and after
    copy = shutil.copytree(folder, tmp_path / "copy")  # the same bytes elsewhere: the same identity
    assert model_fingerprint(copy) == after

    fingerprints._MEMO.clear()  # the next session, with the on-disk memo
    assert model_fingerprint(folder) == after and file_fingerprint(weights) != before_file


def test_a_warm_session_reads_no_bytes_and_a_foreign_memo_entry_is_a_miss(memo_dir: Path, tmp_path: Path) -> None:
    folder = model_folder(tmp_path / "model")
    other = model_folder(tmp_path / "other", seed=1)
    time.sleep(SETTLE_S)
    expected, expected_other = model_fingerprint(folder), model_fingerprint(other)
    assert expected != expected_other
    fingerprints._MEMO.clear()
    read = fingerprints.HASHED_BYTES[0]
    assert model_fingerprint(folder) == expected and fingerprints.HASHED_BYTES[0] == read  # warm: nothing read

    entries = {json.loads(p.read_text())["hash"]: p for p in memo_dir.rglob("*.json")}
    shutil.copyfile(entries[expected_other], entries[expected])  # the other folder's entry, under this name
    fingerprints._MEMO.clear()
    assert model_fingerprint(folder) == expected and fingerprints.HASHED_BYTES[0] > read  # a miss: hashed again
    entries[expected].write_text("{not json")
    fingerprints._MEMO.clear()
    assert model_fingerprint(folder) == expected


def test_a_file_changed_recently_is_hashed_every_time_and_never_remembered(memo_dir: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fingerprints, "RACY_NS", 3600 * 10**9)  # everything counts as just changed
    folder = model_folder(tmp_path / "model")
    weights = folder / "unet" / "weights.safetensors"
    before = model_fingerprint(folder)
    replace_keeping_size_and_mtime(weights, regressed(weights))  # possibly within one clock tick
    assert model_fingerprint(folder) != before and not memo_dir.exists()


def test_no_cache_keeps_no_memo_on_disk(memo_dir: Path, tmp_path: Path) -> None:
    settings.configure(result_cache=False)  # what --diffeval-no-cache sets
    folder = model_folder(tmp_path / "model")
    time.sleep(SETTLE_S)
    model_fingerprint(folder)
    assert not memo_dir.exists()


def test_the_provenance_memo_misses_when_weights_are_replaced_with_the_same_size_and_mtime(
        memo_dir: Path, tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    """The warm-cache path: a rerun reads the provenance (and so the image-cache keys) of the
    pipeline loaded before from this memo; a regressed model must not find it."""
    folder = Path(shutil.copytree(tiny_models["pipe"], tmp_path / "model"))
    weights = next(folder.glob("unet/*.safetensors"))
    time.sleep(SETTLE_S)
    memo = ProvenanceMemo(tmp_path / "cache" / "pipelines")
    key = memo.key(str(folder), "float32", "cpu")
    memo.put(key, {"model_hash": model_fingerprint(folder), "model": str(folder)})
    assert ProvenanceMemo(memo.directory).get(key) is not None

    replace_keeping_size_and_mtime(weights, regressed(weights))
    time.sleep(SETTLE_S)
    fingerprints._MEMO.clear()  # the next session
    rerun = ProvenanceMemo(memo.directory)
    new_key = rerun.key(str(folder), "float32", "cpu")
    assert new_key != key and rerun.get(new_key) is None  # a miss: the pipeline is loaded and re-identified

    shutil.copyfile(rerun._path(key), rerun._path(new_key))  # the old entry under the new name
    assert rerun.get(new_key) is None


PROJECT_TESTS = """
    import json, sys
    from pytest_diffeval import compute_metric
    from pytest_diffeval.metrics import register_metric

    @register_metric("brightness", cacheable=True)
    def brightness(images):
        print("COMPUTED brightness")
        return images.images.mean(axis=(1, 2, 3))

    def test_model(generate):
        images = generate({model!r}, ["a red apple"], seeds=[0, 1], num_inference_steps=2)
        compute_metric("brightness", images)
        print("TORCH", "torch" in sys.modules)
"""


def test_end_to_end_a_warm_cache_serves_nothing_to_a_model_whose_weights_were_swapped_under_touch_r(
        pytester: pytest.Pytester, tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """The reported attack: record a run, replace the UNet weights with regressed ones of the
    same size and restore the old mtime; the warm rerun must generate and measure again."""
    from pytest_diffeval.tiny import perturb_weights

    model = Path(shutil.copytree(tiny_models["pipe"], pytester.path / "model"))
    pytester.makeini("[pytest]\nfilterwarnings = ignore::FutureWarning\n")
    pytester.makepyfile(test_project=PROJECT_TESTS.replace("{model!r}", repr(str(model))).replace("\n    ", "\n"))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")

    def run(fresh: bool = False) -> tuple[bool, bool]:
        """``fresh``: in a new process, where whether torch was imported is the subject."""
        run_pytest = pytester.runpytest_subprocess if fresh else pytester.runpytest
        result = run_pytest("-s", "-p", "no:randomly")
        result.assert_outcomes(passed=1)
        out = result.stdout.str()
        return "COMPUTED brightness" in out, "TORCH True" in out

    assert run() == (True, True)
    assert run(fresh=True) == (False, False)  # warm: images and result from the cache, no model loaded
    weights = next(model.glob("unet/*.safetensors"))
    stat = weights.stat()
    perturb_weights(model, "unet", scale=0.3)
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # touch -r
    assert (weights.stat().st_size, weights.stat().st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    assert run() == (True, True)  # another model: loaded, generated and measured again
