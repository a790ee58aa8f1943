"""``python -m osrjit demo`` — the README demo."""
import argparse
import sys


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m osrjit")
    sub = ap.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="run the demo: a backtrace inside a deep JIT recursion")
    args = ap.parse_args(argv)
    if args.command == "demo":
        from .demo import main as demo
        return demo()
    return 2


if __name__ == "__main__":
    sys.exit(main())
