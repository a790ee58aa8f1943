"""``python scripts/bench.py [--quick] [--json PATH]`` in a source checkout: the benchmark
suite, which ships in the package (:mod:`osrjit.bench.suite`; ``python -m osrjit bench``)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from osrjit.bench.suite import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(prog="python scripts/bench.py"))
