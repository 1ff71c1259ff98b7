"""`python -m mingpt.bench`: the reference path against the fused ones, side by side in one run.

The benchmark is benchmarks/bench.py of the source checkout (what `pip install -e .` installs from); this
command runs it, with the same flags (`--help`).
"""
import importlib.util
import os
import sys

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "bench.py")


def main(argv=None) -> int:
    if not os.path.isfile(BENCH):
        print(f"bench: error: {BENCH} is not here: the benchmarks come with the source checkout "
              "(git clone, then pip install -e .)", file=sys.stderr)
        return 2
    spec = importlib.util.spec_from_file_location("mingpt_benchmarks_bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench.main(argv)


if __name__ == "__main__":
    sys.exit(main())
