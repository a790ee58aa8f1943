"""Full replacement sweeps on the emulated backend: every instruction boundary.

For each scenario of :mod:`osrjit.testing.scenarios` (recursive, mutual
recursion, chained v1 -> v2 -> v3, loop OSR, poll-free callee, three threads)
a replacement is requested after k instructions for every k of the reference
run (>= 2,000 points each), and every point is checked (results, no fault,
no old-code fetch, transfers == hijacks, no stub left, old versions freed).

    python scripts/sweep.py                       # all scenarios, every point
    python scripts/sweep.py --points 200          # a seeded sample per scenario
    python scripts/sweep.py recursive chained --json sweep.json
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from osrjit.testing.scenarios import SCENARIOS  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("scenarios", nargs="*", default=sorted(SCENARIOS),
                    help=f"which (default all): {', '.join(sorted(SCENARIOS))}")
    ap.add_argument("--points", type=int, default=None,
                    help="a seeded sample of this many points (default: every point)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    unknown = [s for s in args.scenarios if s not in SCENARIOS]
    if unknown:
        ap.error(f"unknown scenarios {unknown}")
    results, failed = {}, False
    print(f"{'scenario':<18} {'points':>7} {'passed':>7} {'fail':>5} {'fetches':>8} "
          f"{'run':>6} {'transfers':>10} {'async':>6} {'secs':>7}")
    for name in args.scenarios:
        sc = SCENARIOS[name]
        t0 = time.perf_counter()

        def progress(done, total, name=name):
            if sys.stderr.isatty():
                rate = done / max(1e-9, time.perf_counter() - t0)
                sys.stderr.write(f"\r{name}: {done}/{total} points ({rate:.0f}/s) ")
                sys.stderr.flush()

        report = sc.sweep(points=args.points, seed=args.seed, progress=progress)
        if sys.stderr.isatty():
            sys.stderr.write("\r" + " " * 60 + "\r")
        print(f"{name:<18} {report.points_tried:>7} {report.points_passed:>7} "
              f"{len(report.failures):>5} {report.old_code_fetches:>8} "
              f"{report.run_instructions:>6} {report.transfers:>10} {report.stopped_async:>6} "
              f"{report.seconds:>7.1f}", flush=True)
        for f in report.failures[:10]:
            print(f"    {f}")
        failed = failed or not report.ok
        results[name] = {"points_tried": report.points_tried,
                         "points_passed": report.points_passed,
                         "failures": [{"k": f.k, "reason": f.reason} for f in report.failures],
                         "old_code_fetches": report.old_code_fetches,
                         "run_instructions": report.run_instructions,
                         "transfers": report.transfers, "stopped_async": report.stopped_async,
                         "seconds": round(report.seconds, 2)}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
