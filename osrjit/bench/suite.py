"""osrjit's benchmark suite: every figure side by side in one run.

Each part is a module of :mod:`osrjit.bench` that runs in its own child
process (``python -m osrjit.bench.<part>``: a crash or a leak in one cannot
distort another) and reports medians of repeated runs as JSON, which this
module merges:

====================================  =========================================================
``walk_ns_per_frame``                 ``{"python"|"native"|"glibc": {depth: ns}}`` — the same
                                      stacks (``osrjit/bench/native_walk.py``)
``deopt_ns_per_frame``                ``{"python"|"native"|"plain_return": ns}`` — 100,000
                                      pending frames returning through the stub
                                      (``osrjit/bench/deopt.py``)
``steady_state_ratio``                ``{"patched_direct"|"indirect_slot"|"orc_stub": ratio}``
                                      — fib(27) against a fresh compile (``steady.py``)
``stw_pause_ratio_vs_glibc``          ``{"1"|"2"|"4": ratio}`` — stop-the-world pause (the
                                      stopper's, plus the threads' own hijack writes after
                                      it) over glibc ``backtrace()`` of the same stacks
                                      (``stw.py``)
``rss_growth_bytes_10k_cycles``       RSS growth over 10,000 replace cycles (``memory.py``)
====================================  =========================================================

    python -m osrjit bench [--quick | --smoke] [--json PATH] [--only walk,deopt,...]

(``python scripts/bench.py`` in a source checkout is the same.) ``--quick``
(under a minute or so): fewer rounds, depths up to 1,000, 300 replace cycles
instead of 10,000 (the RSS key then says how many ran). ``--smoke`` (seconds):
every part once at its smallest size — it shows the suite runs on this
installation, its figures mean nothing. A part that fails is reported with
its error and ``null`` figures; the exit status is then 1.
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

PARTS = ("walk", "deopt", "steady", "stw", "memory")

#: Part -> (module of osrjit.bench, its arguments by size: full, quick, smoke).
_PART_RUNS = {
    "walk": ("native_walk", {"full": ["--depths", "100,1000,10000", "--rounds", "7"],
                             "quick": ["--depths", "100,1000", "--rounds", "3"],
                             "smoke": ["--depths", "100", "--rounds", "1"]}),
    "deopt": ("deopt", {"full": [], "quick": ["--quick"],
                        "smoke": ["--depth", "1000", "--rounds", "1", "--python-rounds", "1"]}),
    "steady": ("steady", {"full": ["--rounds", "21"], "quick": ["--rounds", "5"],
                          "smoke": ["--n", "15", "--rounds", "1"]}),
    "stw": ("stw", {"full": ["--rounds", "15"], "quick": ["--rounds", "3"],
                    "smoke": ["--threads", "1", "--depth", "100", "--rounds", "1"]}),
    "memory": ("memory", {"full": ["--cycles", "10000"], "quick": ["--cycles", "300"],
                          "smoke": ["--cycles", "20", "--warmup", "5", "--settled", "10"]}),
}


def _commands(size):
    """Part -> the command line of its child process, for ``size`` ("full", "quick", "smoke")."""
    return {part: [sys.executable, "-m", f"{__package__}.{module}"] + sizes[size]
            for part, (module, sizes) in _PART_RUNS.items()}


def _child_env():
    """The environment of a part's process: the same ``osrjit`` as this one is
    imported first (a source checkout or an installed package alike)."""
    import osrjit
    root = os.path.dirname(os.path.dirname(os.path.abspath(osrjit.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _extract(part, data):
    """The part's figures under the suite's JSON keys."""
    if part == "walk":
        return {"walk_ns_per_frame": data["walk_ns_per_frame"]}
    if part == "deopt":
        return {"deopt_ns_per_frame": data["deopt_ns_per_frame"]}
    if part == "steady":
        return {"steady_state_ratio": data["steady_state_ratio"]}
    if part == "stw":
        return {"stw_pause_ratio_vs_glibc": {n: r["pause_s"] / r["glibc_walk_s"]
                                             for n, r in data.items()},
                "stw_pause_ms": {n: r["pause_s"] * 1e3 for n, r in data.items()},
                "stw_stopper_pause_ms": {n: r["stopper_pause_s"] * 1e3 for n, r in data.items()},
                "stw_self_apply_ms": {n: r["self_apply_s"] * 1e3 for n, r in data.items()},
                "stw_time_to_safepoint_ms": {n: r["time_to_safepoint_s"] * 1e3
                                             for n, r in data.items()},
                "stw_glibc_walk_ms": {n: r["glibc_walk_s"] * 1e3 for n, r in data.items()}}
    if part == "memory":
        return {"rss_growth_bytes_10k_cycles": data["rss_growth_bytes_10k_cycles"],
                "rss_growth_bytes_after_settled": data.get("rss_growth_bytes_after_settled"),
                "replace_cycles": data["cycles"],
                "jit_code_bytes": [data["jit_code_bytes_after_warmup"],
                                   data["jit_code_bytes_after"]]}
    raise ValueError(part)


_NULLS = {"walk": {"walk_ns_per_frame": None}, "deopt": {"deopt_ns_per_frame": None},
          "steady": {"steady_state_ratio": None}, "stw": {"stw_pause_ratio_vs_glibc": None},
          "memory": {"rss_growth_bytes_10k_cycles": None}}


def main(argv=None, prog=None):
    """Run the suite (``argv``: the command line after ``bench``); the exit status."""
    ap = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a run of about a minute")
    size.add_argument("--smoke", action="store_true",
                      help="every part once at its smallest size (seconds; figures meaningless)")
    ap.add_argument("--json", metavar="PATH", help="write the merged figures here")
    ap.add_argument("--only", default=",".join(PARTS),
                    help=f"comma-separated subset of {','.join(PARTS)}")
    args = ap.parse_args(argv)
    parts = [p for p in args.only.split(",") if p]
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        ap.error(f"unknown parts {unknown}")
    commands = _commands("smoke" if args.smoke else "quick" if args.quick else "full")
    result = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "cpus": os.cpu_count(), "processor": _cpu_name()},
              "quick": args.quick, "smoke": args.smoke, "errors": {}}
    env = _child_env()
    started = time.perf_counter()
    for i, part in enumerate(parts, 1):
        print(f"[{i}/{len(parts)}] {part}: {' '.join(commands[part][2:])}"
              f"   ({time.perf_counter() - started:.0f} s elapsed)", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, f"{part}.json")
            t0 = time.perf_counter()
            proc = subprocess.run(commands[part] + ["--json", path], env=env)
            seconds = time.perf_counter() - t0
            if proc.returncode != 0 or not os.path.exists(path):
                result["errors"][part] = f"exit status {proc.returncode}"
                result.update(_NULLS[part])
                print(f"    {part} FAILED (exit status {proc.returncode})", flush=True)
                continue
            with open(path) as fh:
                result.update(_extract(part, json.load(fh)))
            print(f"    {part} done in {seconds:.0f} s", flush=True)
    result["seconds"] = time.perf_counter() - started
    print(json.dumps({k: v for k, v in result.items() if k not in ("machine",)}, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 1 if result["errors"] else 0


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
