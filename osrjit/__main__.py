"""``python -m osrjit demo`` — the README demo; ``python -m osrjit bench`` — the benchmarks."""
import argparse
import os
import runpy
import sys


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        return _bench(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m osrjit")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the demo: a backtrace inside a deep JIT recursion")
    sub.add_parser("bench", help="run the benchmarks (scripts/bench.py; --quick, --json PATH)")
    args = ap.parse_args(argv)
    if args.command == "demo":
        from .demo import main as demo
        return demo()
    return 2


def _bench(rest):
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "scripts", "bench.py")
    if not os.path.exists(script):
        print("python -m osrjit bench needs a source checkout (scripts/bench.py); "
              f"not found at {script}", file=sys.stderr)
        return 2
    return runpy.run_path(script)["main"](rest)


if __name__ == "__main__":
    sys.exit(main())
