"""Fuzz report: hostile input into every public entry that takes object bytes, IR or source.

Per target, ``--cases`` cases drawn from ``--seed`` (harness:
:mod:`osrjit.testing.fuzz`), and a table of how they ended:

* ``unwinder``, ``framemaps``, ``loader``, ``patching``: mutated relocatable
  objects (the same object goes through all four) into
  ``AddressSpace.add_code_object`` + walks, ``ObjectImage`` +
  ``frame_maps_for_object``, the emulated loader, and the native backend's
  direct call sites (``patching.call_sites``);
* ``compile_source``: mutated reference-language source into ``lang.compile_source``;
* ``emit_object``, ``compile_ir``, ``replace``: mutated LLVM IR into
  ``emit_object`` and into ``Runtime.compile_ir`` / ``Runtime.replace`` of a
  native runtime (which must still compile and call a function every 1,000
  cases and at the end) — each target in child processes: a case that kills
  its child (an LLVM abort) counts as a ``crash`` (foreign), named with the
  arguments that replay it, and a new child goes on after it.

An outcome is ``valid`` or the class of the error a case ended with; *foreign*
counts errors that are not the target's own package's (must be 0).

    python scripts/fuzz_report.py [--cases 20000] [--seed 0] [--json PATH] [targets...]

Exit status 1 if any case was foreign (a crash included).
"""
import argparse
import io
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from osrjit.testing import fuzz  # noqa: E402

OBJECT_TARGETS = ("unwinder", "framemaps", "loader", "patching")
TEXT_TARGETS = ("compile_source", "emit_object", "compile_ir", "replace")
TARGETS = OBJECT_TARGETS + TEXT_TARGETS


def run_objects(names, cases, seed):
    """``{target: Tally}`` for the object targets among ``names`` (each
    mutated object goes through all of them)."""
    rng = random.Random(f"{seed}:objects")
    seeds = fuzz.seed_objects()
    targets = [t for t in fuzz.object_targets() if t.name in names]
    tallies = {t.name: fuzz.Tally(t.name) for t in targets}
    for _ in range(cases):
        seed_object = seeds[rng.randrange(len(seeds))]
        data = fuzz.mutate(seed_object, fuzz.random_object_edits(rng))
        choice = rng.randrange(1 << 12)
        for t in targets:
            tallies[t.name].timed(lambda: t.run(seed_object, data, choice))
    return tallies


def text_cases(name, cases, seed):
    """``(k, case)`` for k in ``range(cases)``: the k-th mutated source or
    FunctionIR of target ``name`` (the same for a given seed, however the
    run is split between children)."""
    rng = random.Random(f"{seed}:{name}")
    irs = fuzz.seed_irs()
    for k in range(cases):
        if name == "compile_source":
            program = fuzz.SEED_PROGRAMS[rng.randrange(len(fuzz.SEED_PROGRAMS))]
            edits = fuzz.random_text_edits(rng)
            yield k, lambda: fuzz.mutate_text(program, edits, fuzz.SOURCE_VOCABULARY)
        else:
            ir, edits = irs[rng.randrange(len(irs))], fuzz.random_text_edits(rng)
            yield k, lambda: fuzz.mutate_ir(ir, edits)


def run_text_child(name, cases, seed, start, log_path):
    """Child mode: run cases ``start..cases-1`` of a text target, appending to
    ``log_path`` the index of each case before it runs (``k start``) and its
    outcome after (a JSON line), so the parent can count the cases done and
    name the one that killed the process."""
    with open(log_path, "a") as log:
        def note(line):
            log.write(line + "\n")
            log.flush()

        def record(k, outcome, seconds):
            note(json.dumps([k, outcome.kind, outcome.foreign, round(seconds, 6),
                             outcome.detail if outcome.foreign else ""]))

        if name == "compile_source":
            run = fuzz.run_source
        elif name == "emit_object":
            from osrjit.compiling import target_machine
            tm = target_machine(2)

            def run(ir):
                return fuzz.run_emit(ir, tm)
        else:
            import osrjit
            rt = osrjit.Runtime()
            for program in fuzz.SEED_PROGRAMS:
                rt.compile(program)
            run = fuzz.RuntimeCompiler(rt, name)
        for k, case in text_cases(name, cases, seed):
            if k < start:
                continue
            note(f"{k} start")
            t0 = time.perf_counter()
            outcome = run(case())
            record(k, outcome, time.perf_counter() - t0)
            if name in ("compile_ir", "replace") and (k % 1000 == 999 or k == cases - 1):
                if not run.check_alive(k):
                    record(k, fuzz.Outcome(name, "broken", True,
                                           f"the runtime no longer compiles and calls a function "
                                           f"after case {k}"), 0.0)
    return 0


def run_text_in_children(name, cases, seed):
    """The Tally of a text target, run by child interpreters: a child killed
    by a case counts that case as a crash (foreign) and the next child goes
    on with the case after it."""
    tally = fuzz.Tally(name)
    start = 0
    with tempfile.TemporaryDirectory(prefix="fuzz-report-") as tmp:
        while start < cases:
            log_path = os.path.join(tmp, f"{name}-{start}.log")
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", name,
                                   "--cases", str(cases), "--seed", str(seed),
                                   "--start", str(start), "--log", log_path],
                                  capture_output=True, text=True)
            running = None
            with open(log_path) if os.path.exists(log_path) else io.StringIO() as log:
                for line in log:
                    if line.endswith(" start\n"):
                        running = int(line.split()[0])
                        continue
                    k, kind, foreign, seconds, detail = json.loads(line)
                    tally.add(fuzz.Outcome(name, kind, foreign, detail), seconds)
                    running = None
            if proc.returncode == 0:
                break
            what = (signal.Signals(-proc.returncode).name if proc.returncode < 0
                    else f"exit status {proc.returncode}")
            where = "while starting" if running is None else f"in case {running}"
            tally.add(fuzz.Outcome(name, f"crash ({what})", True,
                                   f"child {what} {where} (replay: --child {name} --seed {seed} "
                                   f"--start {running} --cases {(running or 0) + 1}):\n"
                                   f"{proc.stderr[-1500:]}"))
            if running is None:
                break
            start = running + 1
    return tally


def _row(tally):
    return {"target": tally.target, "cases": tally.cases, "outcomes": dict(tally.outcomes),
            "foreign": tally.foreign_count, "seconds": round(tally.seconds, 2),
            "first_foreign": [f"{o.kind}: {o.detail}" for o in tally.foreign]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("targets", nargs="*", default=list(TARGETS),
                    help=f"which (default all): {', '.join(TARGETS)}")
    ap.add_argument("--cases", type=int, default=20_000, help="cases per target (default 20,000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--child", choices=TEXT_TARGETS, help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--log", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return run_text_child(args.child, args.cases, args.seed, args.start,
                              args.log or os.devnull)
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        ap.error(f"unknown targets {unknown}")

    rows = []
    t0 = time.perf_counter()
    objects = [t for t in args.targets if t in OBJECT_TARGETS]
    if objects:
        rows += [_row(t) for t in run_objects(objects, args.cases, args.seed).values()]
    for name in (t for t in args.targets if t in TEXT_TARGETS):
        rows.append(_row(run_text_in_children(name, args.cases, args.seed)))

    print(f"{'target':<15} {'cases':>7} {'foreign':>8} {'seconds':>8}  outcomes")
    for row in rows:
        outcomes = ", ".join(f"{kind} {n}" for kind, n in
                             sorted(row["outcomes"].items(), key=lambda kv: -kv[1]))
        print(f"{row['target']:<15} {row['cases']:>7} {row['foreign']:>8} {row['seconds']:>8.1f}  "
              f"{outcomes}")
    for row in rows:
        for text in row["first_foreign"]:
            print(f"\n--- foreign in {row['target']} ---\n{text}")
    print(f"\n{sum(r['cases'] for r in rows)} cases in {time.perf_counter() - t0:.1f} s "
          f"(seed {args.seed})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"seed": args.seed, "cases_per_target": args.cases, "targets": rows}, f,
                      indent=2)
    return 1 if any(r["foreign"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
