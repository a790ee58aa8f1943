"""Report: many runtimes one after another in one process — does a runtime leave anything behind?

Runs :func:`osrjit.testing.hygiene.runtime_cycles`: each cycle creates a
native runtime, compiles, calls on this thread (the hook replaces the
function with its frames live) and on a helper thread, and closes it;
cycles alternate the reference paths and the native fast paths. Prints, after
the warm-up (``--warmup``, default 10 % of the cycles), the RSS growth per
cycle in bytes, the open fds and threads at the warm-up and at the end, how
many closed runtimes are still alive, and the seconds taken.

The default compiles at ``--opt-level 0``: every run of llvmlite's ``O1``-``O3``
pass pipeline leaks about 60 KB in the process that runs it (see
``osrjit/native/compiler.py``), which is not the runtime's; ``--opt-level 2
--compiler worker`` runs the pipeline in the shared compile worker, and
``--opt-level 2`` alone shows the pipeline's leak.

    python scripts/hygiene_report.py [--cycles 10000] [--warmup N] [--replace-every 1]
                                     [--opt-level 0] [--compiler inprocess|worker] [--json PATH]
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=10_000)
    ap.add_argument("--warmup", type=int, default=None,
                    help="measure growth from this cycle on (default: 10%% of --cycles)")
    ap.add_argument("--replace-every", type=int, default=1,
                    help="one pair of cycles in this many replaces (default: every cycle)")
    ap.add_argument("--opt-level", type=int, default=0, choices=range(4))
    ap.add_argument("--compiler", choices=("inprocess", "worker"), default="inprocess")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    from osrjit.testing.hygiene import runtime_cycles

    def progress(done, total):
        if sys.stderr.isatty():
            sys.stderr.write(f"\rruntimes: {done}/{total}")
    report = runtime_cycles(args.cycles, warmup=args.warmup, replace_every=args.replace_every,
                            opt_level=args.opt_level, compiler=args.compiler, progress=progress)
    if sys.stderr.isatty():
        sys.stderr.write("\r" + " " * 40 + "\r")
    print(f"opt_level={args.opt_level} compiler={args.compiler} "
          f"replace_every={args.replace_every}: {report.summary()}")
    print("cycle  rss_bytes  fds  threads  seconds")
    for s in report.samples:
        print(f"{s.cycle:5d}  {s.rss_bytes:9d}  {s.fds:3d}  {s.native_threads:7d}  {s.seconds:7.1f}")
    out = report.as_json()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return 0 if report.failure is None else 1


if __name__ == "__main__":
    sys.exit(main())
