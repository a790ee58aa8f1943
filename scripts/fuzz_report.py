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
  cases and at the end) — each target in a child process, so an LLVM abort
  shows as a crashed row instead of ending the report.

An outcome is ``valid`` or the class of the error a case ended with; *foreign*
counts errors that are not the target's own package's (must be 0).

    python scripts/fuzz_report.py [--cases 20000] [--seed 0] [--json PATH] [targets...]

Exit status 1 if any case was foreign or a child crashed.
"""
import argparse
import json
import os
import random
import signal
import subprocess
import sys
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


def run_text(name, cases, seed):
    """The Tally of one text target (in this process)."""
    rng = random.Random(f"{seed}:{name}")
    tally = fuzz.Tally(name)
    if name == "compile_source":
        for _ in range(cases):
            program = fuzz.SEED_PROGRAMS[rng.randrange(len(fuzz.SEED_PROGRAMS))]
            source = fuzz.mutate_text(program, fuzz.random_text_edits(rng),
                                      fuzz.SOURCE_VOCABULARY)
            tally.timed(lambda: fuzz.run_source(source))
        return tally
    irs = fuzz.seed_irs()

    def mutated():
        return fuzz.mutate_ir(irs[rng.randrange(len(irs))], fuzz.random_text_edits(rng))

    if name == "emit_object":
        from osrjit.compiling import target_machine
        tm = target_machine(2)
        for _ in range(cases):
            ir = mutated()
            tally.timed(lambda: fuzz.run_emit(ir, tm))
        tm.close()
        return tally
    import osrjit
    with osrjit.Runtime() as rt:
        for program in fuzz.SEED_PROGRAMS:
            rt.compile(program)
        compiler = fuzz.RuntimeCompiler(rt, name)
        for k in range(cases):
            ir = mutated()
            tally.timed(lambda: compiler(ir))
            if k % 1000 == 999 and not compiler.check_alive(k):
                tally.add(fuzz.Outcome(name, "broken", True, f"runtime dead after {k + 1} cases"))
        if not compiler.check_alive(cases):
            tally.add(fuzz.Outcome(name, "broken", True, "runtime dead at the end"))
    return tally


def _row(tally):
    return {"target": tally.target, "cases": tally.cases, "outcomes": dict(tally.outcomes),
            "foreign": tally.foreign_count, "seconds": round(tally.seconds, 2),
            "first_foreign": [f"{o.kind}: {o.detail}" for o in tally.foreign]}


def run_text_in_child(name, cases, seed):
    """Row of a text target run by a child interpreter (a crash is a row too)."""
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", name,
                           "--cases", str(cases), "--seed", str(seed)],
                          capture_output=True, text=True)
    if proc.returncode == 0:
        return json.loads(proc.stdout.splitlines()[-1])
    what = (f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
            else f"exit status {proc.returncode}")
    return {"target": name, "cases": 0, "outcomes": {}, "foreign": 1, "seconds": 0.0,
            "first_foreign": [f"child {what}: {proc.stderr[-2000:]}"]}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("targets", nargs="*", default=list(TARGETS),
                    help=f"which (default all): {', '.join(TARGETS)}")
    ap.add_argument("--cases", type=int, default=20_000, help="cases per target (default 20,000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", metavar="PATH")
    ap.add_argument("--child", choices=TEXT_TARGETS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(_row(run_text(args.child, args.cases, args.seed))))
        return 0
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        ap.error(f"unknown targets {unknown}")

    rows = []
    t0 = time.perf_counter()
    objects = [t for t in args.targets if t in OBJECT_TARGETS]
    if objects:
        rows += [_row(t) for t in run_objects(objects, args.cases, args.seed).values()]
    for name in (t for t in args.targets if t in TEXT_TARGETS):
        rows.append(run_text_in_child(name, args.cases, args.seed))

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
