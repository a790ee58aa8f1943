"""Benchmark: memory after many replace cycles — does replacing leak?

A runtime compiles ``f`` and a caller ``g``; each *cycle* replaces ``f`` with
the other of two versions (alternating) and calls ``g`` once, so every cycle
links a new JIT library, publishes it, scans the stack and frees the
previous version. Resident set size (``/proc/self/statm``) and the JIT code
bytes still loaded (``.text`` of every live version) are read after
``--warmup`` cycles and after ``--cycles`` cycles; the growth between the two
is the figure. The growth from ``--settled`` cycles on is reported too: the
first few hundred cycles raise the allocator's high-water mark once.

    python -m osrjit.bench.memory [--cycles 10000] [--warmup 10] [--json PATH]

JSON: ``{"rss_growth_bytes_10k_cycles": bytes, ...}`` (the key keeps its name
when ``--cycles`` differs; ``cycles`` says how many ran).
"""
import argparse
import gc
import json
import os
import sys
import time

F_V1 = """
def f(x):
    return x * 3 + 1
"""
F_V2 = """
def f(x):
    y = x * 3
    return y + 1
"""
G = """
def g(x):
    return f(x) + f(x + 1)
"""


def rss_bytes():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def code_bytes(rt):
    return sum(v.code_range[1] - v.code_range[0] for n in rt.names() for v in rt.versions(n))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=10_000)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--settled", type=int, default=1000,
                    help="also report the growth from this cycle on (allocator warm-up excluded)")
    ap.add_argument("--compiler", choices=("worker", "inprocess"), default="worker",
                    help="where versions are optimised (default: the compile worker)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    from osrjit import Runtime
    rt = Runtime(compiler=args.compiler)
    rt.compile(F_V1)
    rt.compile(G)
    g = rt.function("g")
    sources = (F_V2, F_V1)
    marks = {}
    t0 = time.perf_counter()
    for cycle in range(1, args.cycles + 1):
        rt.replace("f", sources[cycle % 2])
        assert g(5) == 16 + 19
        if cycle in (args.warmup, args.settled, args.cycles):
            gc.collect()
            marks[cycle] = (rss_bytes(), code_bytes(rt))
        if sys.stderr.isatty() and cycle % 100 == 0:
            rate = cycle / (time.perf_counter() - t0)
            sys.stderr.write(f"\rreplace cycles: {cycle}/{args.cycles} ({rate:.0f}/s)")
    if sys.stderr.isatty():
        sys.stderr.write("\r" + " " * 50 + "\r")
    seconds = time.perf_counter() - t0
    stats = rt.stats()
    (rss0, code0), (rss1, code1) = marks[args.warmup], marks[args.cycles]
    settled = marks.get(args.settled) if args.settled < args.cycles else None
    out = {"rss_growth_bytes_10k_cycles": rss1 - rss0, "cycles": args.cycles,
           "compiler": args.compiler,
           "warmup": args.warmup, "rss_after_warmup": rss0, "rss_after": rss1,
           "jit_code_bytes_after_warmup": code0, "jit_code_bytes_after": code1,
           "freed_versions": stats["freed_versions"], "live_versions": stats["live_versions"],
           "seconds_per_cycle": seconds / args.cycles,
           "rss_growth_bytes_after_settled": None if settled is None else rss1 - settled[0],
           "settled": args.settled}
    print(f"compiler={args.compiler}: after {args.warmup} cycles: RSS {rss0 / 2**20:.1f} MiB, JIT code {code0} bytes; "
          f"after {args.cycles}: RSS {rss1 / 2**20:.1f} MiB, JIT code {code1} bytes; "
          f"growth {(rss1 - rss0) / 2**10:.0f} KiB; {stats['freed_versions']} versions freed; "
          f"{seconds / args.cycles * 1e3:.2f} ms per cycle"
          + ("" if settled is None else
             f"; from cycle {args.settled} on: {(rss1 - settled[0]) / 2**10:.0f} KiB"))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    rt.close()
    return out


if __name__ == "__main__":
    main()
