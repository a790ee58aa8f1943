"""``python -m osrjit demo`` — the README demo; ``python -m osrjit bench`` — the benchmarks
(:mod:`osrjit.bench`, shipped in the package: no source checkout needed)."""
import argparse
import sys


def main(argv=None):
    """Run a command (``argv``: the arguments after ``python -m osrjit``); the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:                # its own options: --quick, --smoke, --json, --only
        from .bench.suite import main as bench
        return bench(argv[1:], prog="python -m osrjit bench")
    from . import __version__
    ap = argparse.ArgumentParser(prog="python -m osrjit")
    ap.add_argument("--version", action="version", version=f"osrjit {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the demo: a backtrace inside a deep JIT recursion")
    sub.add_parser("bench", help="run the benchmarks (python -m osrjit bench --help)")
    args = ap.parse_args(argv)
    if args.command == "demo":
        from .demo import main as demo
        return demo()
    return 2


if __name__ == "__main__":
    sys.exit(main())
