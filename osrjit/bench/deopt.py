"""Benchmark: returning through 100,000 deopt stubs, Python vs native transfer vs plain return.

A JIT recursion ``sum(n) = n + sum(n − 1)`` goes D frames deep (default
100,000, on a thread with a 512 MB stack) and calls ``hook`` at the bottom.
Inside the hook:

* **python** / **native**: ``rt.replace("sum", …)`` with
  ``Runtime(transfer="python")`` / ``Runtime(transfer="native")`` hijacks
  every one of the D + 1 pending frames; the clock starts when the hook
  returns, so every frame then returns into the deopt stub, is rebuilt in
  version 2 and finishes there;
* **plain_return**: nothing is replaced; the same D + 1 frames of the same
  code simply return.

The clock stops when the outermost call returns to Python; the figure is
nanoseconds per frame (the elapsed time divided by D + 1), the median of
``--rounds`` runs (``--python-rounds`` for the slow Python transfer). Each
run checks the result and that every frame was transferred (or none was).

    python -m osrjit.bench.deopt [--depth 100000] [--rounds 7] [--python-rounds 3] [--json PATH]
    python -m osrjit.bench.deopt --quick        # depth 20,000, 3 rounds, 1 Python round

``--json PATH`` writes ``{"deopt_ns_per_frame": {"python": x, "native": y,
"plain_return": z}, ...}``.
"""
import argparse
import json
import statistics
import threading
import time

V1 = """
def sum(n):
    if n == 0:
        return hook(0)
    return n + sum(n - 1)
"""
V2 = """
def sum(n):
    if n == 0:
        return hook(0)
    return 2 * n + sum(n - 1)
"""

#: Stack of the thread that recurses (bytes); 100,000 frames of sum need ~5 MB.
STACK_BYTES = 512 << 20


def one_run(mode, depth):
    """Nanoseconds per frame of one unwinding of ``depth + 1`` frames.

    ``mode``: ``"python"`` / ``"native"`` (replace at the bottom with that
    transfer) or ``"plain_return"`` (no replacement).
    """
    import osrjit
    transfer = "python" if mode == "plain_return" else mode
    out = {}
    with osrjit.Runtime(transfer=transfer) as rt:
        rt.compile(V1)

        def on_hook(_):
            if mode != "plain_return":
                rt.replace("sum", V2)
            out["t0"] = time.perf_counter_ns()
            return 0

        rt.on_hook(on_hook)
        fn = rt.function("sum")

        def run():
            out["result"] = fn(depth)
            out["t1"] = time.perf_counter_ns()

        t = threading.Thread(target=run)
        t.start()
        t.join()
        stats = rt.stats()
    frames = depth + 1
    if mode == "plain_return":
        expected, transfers = depth * (depth + 1) // 2, 0
    else:
        expected, transfers = depth * (depth + 1), frames
    if out.get("result") != expected or stats["transfers"] != transfers:
        raise SystemExit(f"{mode}: wrong run: result {out.get('result')} (expected {expected}), "
                         f"stats {stats}")
    if mode == "native" and stats["native_transfers"] != frames:
        raise SystemExit(f"native: only {stats['native_transfers']} of {frames} frames "
                         f"were transferred natively: {stats}")
    return (out["t1"] - out["t0"]) / frames


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--python-rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true",
                    help="depth 20,000, 3 rounds, 1 Python round (python -m osrjit bench --quick)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    if args.quick:
        args.depth, args.rounds, args.python_rounds = 20_000, 3, 1
    if args.depth < 1 or args.rounds < 1 or args.python_rounds < 1:
        ap.error("--depth, --rounds and --python-rounds must be at least 1")
    threading.stack_size(STACK_BYTES)
    results = {}
    runs = {}
    for mode, rounds in (("plain_return", args.rounds), ("native", args.rounds),
                         ("python", args.python_rounds)):
        times = [one_run(mode, args.depth) for _ in range(rounds)]
        runs[mode] = times
        results[mode] = statistics.median(times)
        print(f"{mode:>13}: {results[mode]:10.1f} ns/frame  (median of {rounds}: "
              + ", ".join(f"{t:.1f}" for t in times) + ")", flush=True)
    print(f"native / plain return: {results['native'] / results['plain_return']:.1f}x; "
          f"python / native: {results['python'] / results['native']:.0f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"deopt_ns_per_frame": results, "depth": args.depth,
                       "frames": args.depth + 1, "runs_ns_per_frame": runs}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
