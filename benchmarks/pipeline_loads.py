"""Figure 3: how many times the model is loaded for 1, 10 and 50 tests on one model, in
one process and under ``-n 2``.

    /work/venv/bin/python benchmarks/pipeline_loads.py [--sizes 1 10 50] [--threads 1]

Each size is a fresh pytest project of N tests that each load the embedded model
(``diffusion_pipeline``) and generate one image with it (``generate``, no image cache);
the loads are read from the ``-v`` summary (``diffeval loads in ...``).
Goal: 1 load per worker.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import check_exit, figure, header, pytest_command, timed  # noqa: E402

TESTS = """
    import pytest

    MODEL = "diffeval/tiny-t2i"

    @pytest.mark.parametrize("i", range({n}))
    def test_uses_the_model(diffusion_pipeline, generate, i):
        assert diffusion_pipeline(MODEL) is diffusion_pipeline(MODEL)
        generate(MODEL, [f"a red digit {{i % 10}} on a blue background"], seeds=[i], num_inference_steps=2)
"""


def loads(output: str) -> dict[str, int]:
    """Loads of the model per process (``this process`` or ``gwN``)."""
    out = {}
    for where, pipelines in re.findall(r"diffeval loads in (this process|gw\d+): pipelines ([^;\n]*)", output):
        out[where] = sum(int(n) for n in re.findall(r"tiny-t2i: (\d+)", pipelines))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 10, 50])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    header("pipeline loads for N tests on one model", "1 load per worker")
    ok = True
    with tempfile.TemporaryDirectory(prefix="diffeval-bench-") as tmp:
        for n in args.sizes:
            for workers in ([0, 2] if n >= 10 else [0]):
                project = Path(tmp) / f"n{n}-w{workers}"
                project.mkdir()
                (project / f"test_n{n}.py").write_text(textwrap.dedent(TESTS.format(n=n)))
                (project / "pytest.ini").write_text("[pytest]\nfilterwarnings = ignore::FutureWarning\n")
                wall, output, code = timed(pytest_command("-v", "--diffeval-no-cache", "-n", str(workers)),
                                           threads=args.threads, cwd=project)
                check_exit(code, output, (0,))
                counted = loads(output)
                per_worker = sorted(counted.values())
                met = bool(per_worker) and all(v == 1 for v in per_worker)
                ok = ok and met
                where = "one process" if workers == 0 else f"-n {workers}"
                print(f"   {n:>3} tests, {where:<11}: loads {counted}  ({wall:.1f}s){'' if met else '  <-- not 1'}",
                      flush=True)
    figure("loads per worker", "1 in every case" if ok else "more than 1 somewhere (see above)", "1 per worker", ok)


if __name__ == "__main__":
    main()
