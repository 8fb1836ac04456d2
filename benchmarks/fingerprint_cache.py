"""Figure: the cost of a local model folder's content identity in a new session (a new
worker, a new CI run on the same machine), without and with the on-disk fingerprint memo.

    python benchmarks/fingerprint_cache.py [--mb 500] [--files 5] [--repeats 3]

Writes a synthetic model folder of ``--mb`` MB (``--files`` weight files of random bytes
plus a ``model_index.json``) in a temporary folder, then times ``model_fingerprint`` in
fresh processes: cold (no memo: every byte is read and hashed, what every worker of every
session paid before the memo) and warm (the memo written by the cold run: one ``stat`` per
file and one small JSON read).  The files were just written, so the cold figure reads them
from the page cache: a first read from disk is slower still.  Goal: warm < 10 ms for any
folder size.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MEASURE = """
import json, sys, time
from pathlib import Path
from pytest_diffeval import fingerprints, settings
settings.configure(cache_dir=Path(sys.argv[2]) if sys.argv[2] != "-" else None, result_cache=True)
start = time.perf_counter()
value = fingerprints.model_fingerprint(Path(sys.argv[1]))
print(json.dumps({"seconds": time.perf_counter() - start, "hash": value, "read": fingerprints.HASHED_BYTES[0]}))
"""


def measure(folder: Path, cache: Path | None) -> dict[str, float]:
    done = subprocess.run([sys.executable, "-c", MEASURE, str(folder), str(cache) if cache else "-"], check=True,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=500)
    parser.add_argument("--files", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="diffeval-fp-") as tmp:
        folder = Path(tmp) / "model"
        (folder / "unet").mkdir(parents=True)
        (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
        per_file = args.mb * 2**20 // args.files
        for i in range(args.files):
            with open(folder / "unet" / f"part-{i}.safetensors", "wb") as handle:
                for _ in range(per_file // 2**20):
                    handle.write(os.urandom(2**20))
        time.sleep(2.5)  # past the racy window (fingerprints.RACY_NS): the files count as settled
        cold = [measure(folder, None) for _ in range(args.repeats)]  # no memo: what each session paid
        cache = Path(tmp) / "cache"
        first = measure(folder, cache)  # hashes and writes the memo
        warm = [measure(folder, cache) for _ in range(args.repeats)]
        assert len({r["hash"] for r in [*cold, first, *warm]}) == 1, "the memo gave another hash"
        size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
        cold_s = statistics.median(r["seconds"] for r in cold)
        warm_s = statistics.median(r["seconds"] for r in warm)
        print(f"folder: {size / 2**20:.0f} MB in {args.files + 1} files; {os.cpu_count()} CPUs, "
              f"load average {os.getloadavg()[0]:.2f}")
        print(f"cold (no memo, every byte hashed): {cold_s:.3f} s median of {args.repeats} "
              f"({size / 2**20 / cold_s:.0f} MB/s), {cold[0]['read'] / 2**20:.0f} MB read")
        print(f"first run with a cache dir (hash + write memo): {first['seconds']:.3f} s")
        print(f"warm (memo on disk, new process): {warm_s * 1000:.2f} ms median of {args.repeats}, "
              f"{warm[0]['read']} bytes read; {cold_s / warm_s:.0f}x faster")


if __name__ == "__main__":
    main()
