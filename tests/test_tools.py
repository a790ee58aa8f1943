"""perf and gdb see JIT code: perf maps, jitdump, the GDB JIT interface, line tables.

The perf and gdb runs watch ``tests/tools_scenarios.py`` from outside, in a
subprocess with a timeout; they skip, saying why, where the tool is missing
or cannot record here.
"""
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys

import pytest
from elftools.elf.elffile import ELFFile

import osrjit
from osrjit import lang
from osrjit.compiling import emit_object, target_machine
from osrjit.native.tooling import GdbJitInterface, code_symbols, debug_object, line_rows
from unwinder.elfobject import read_object

TESTS = os.path.dirname(os.path.abspath(__file__))
SCENARIOS = os.path.join(TESTS, "tools_scenarios.py")
FIB = "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n"
TIMEOUT = 300


def _scenario(*args, prefix=(), env=None, cwd=None):
    """Run a scenario (under ``prefix``, e.g. perf record) and return
    (its RESULT fields, the whole output)."""
    proc = subprocess.run([*prefix, sys.executable, SCENARIOS, *args], capture_output=True,
                          text=True, timeout=TIMEOUT, env={**os.environ, **(env or {})},
                          cwd=cwd)
    out = proc.stdout + proc.stderr
    match = re.search(r"^RESULT (.*)$", proc.stdout, re.M)
    assert match, f"the scenario did not finish (exit {proc.returncode}):\n{out[-3000:]}"
    return json.loads(match.group(1)), out


def _map_lines(pid):
    path = f"/tmp/perf-{pid}.map"
    try:
        with open(path) as f:
            return [line.split(maxsplit=2) for line in f.read().splitlines()]
    finally:
        if os.path.exists(path):
            os.unlink(path)


# -- the objects tools read -----------------------------------------------------------


def _fib_object():
    [fir] = lang.compile_source(FIB, filename="/src/fib.py")
    return emit_object(fir, target_machine(2), 2), fir


def test_debug_object_places_sections_and_names_symbols_and_subprograms_by_version():
    obj, fir = _fib_object()
    text = 0x7f0000001000
    out = debug_object(obj, {".text": text}, {fir.symbol: "fib@v3",
                                              fir.resume_symbol: "fib@v3.resume"})
    image = read_object(out)
    assert image.section(".text").addr == text
    names = {s.name for s in image.symbols}
    assert {"fib@v3", "fib@v3.resume"} <= names and fir.symbol not in names
    # gdb names frames after the DWARF subprograms: they carry the version too.
    dwarf = ELFFile(io.BytesIO(out)).get_dwarf_info()
    subprograms = {die.attributes["DW_AT_name"].value.decode()
                   for cu in dwarf.iter_CUs() for die in cu.iter_DIEs()
                   if die.tag == "DW_TAG_subprogram"}
    assert subprograms == {"fib@v3", "fib@v3.resume"}
    [cu] = dwarf.iter_CUs()
    lines = dwarf.line_program_for_CU(cu)
    entry = lines["file_entry"][0]
    assert (lines["include_directory"][entry.dir_index - 1], entry.name) == (b"/src", b"fib.py")
    assert {e.state.line for e in lines.get_entries() if e.state} >= {2, 4}   # the calls
    # The object the loader runs is untouched.
    assert read_object(obj).section(".text").addr == 0


def test_line_rows_are_the_line_table_at_the_load_address():
    obj, fir = _fib_object()
    rows = line_rows(obj, {".text": 0x1000})
    assert {r.filename for r in rows} == {"/src/fib.py"}
    assert {r.line for r in rows} >= {1, 2, 4}
    [entry] = [s for s in code_symbols(obj, {".text": 0x1000}, {}) if s.name == fir.symbol]
    assert all(0x1000 <= r.address for r in rows) and any(r.address == entry.start for r in rows)


def test_code_symbols_are_the_functions_at_their_load_addresses():
    obj, fir = _fib_object()
    symbols = code_symbols(obj, {".text": 0x1000}, {fir.symbol: "fib@v1"})
    by_name = {s.name: s for s in symbols}
    entry = by_name["fib@v1"]
    assert entry.start == 0x1000 and entry.size > 0
    assert by_name[fir.resume_symbol].start >= entry.start + entry.size


PROGRAM = """\
def collatz(n):
    steps = 0
    while n != 1 and steps < 1000:
        if n % 2 == 0:
            n = n // 2
        else:
            n = 3 * n + 1
        steps += 1
        safepoint()
    return steps

def total(k):
    s = 0
    i = 1
    while i <= k:
        s += collatz(i) if i % 3 else -collatz(i) // 2
        i += 1
    return s + hook(s)
"""


def _run_program(filename):
    with osrjit.Runtime() as rt:
        rt.compile(PROGRAM, filename=filename)
        rt.on_hook(lambda x: 1)
        before = rt.function("total")(60)

        def replace_inside(x):      # frames of collatz and total are live here
            rt.replace("collatz", PROGRAM.split("\ndef total")[0].replace("steps += 1",
                                                                          "steps += 2"),
                       filename=filename)
            rt.on_hook(lambda x: 1)
            return 1
        rt.on_hook(replace_inside)
        during = rt.function("total")(60)
        after = rt.function("total")(60)
        return before, during, after, rt.stats()["pending_returns"]


def test_line_tables_leave_the_code_and_its_replacement_alone():
    plain = _run_program(None)
    assert _run_program("program.py") == plain
    assert plain[0] != plain[2]


def test_ir_authors_source_info_reaches_gdb_with_versioned_subprograms():
    from osrjit.ir import I64, SourceInfo, VersionedFunction

    def body(fb):
        fb.poll(1, live=["n"])
        fb.set_line(3)
        fb.builder.ret(fb.builder.add(fb.load("n"), I64(1)))

    fir = VersionedFunction("inc", ["n"], source=SourceInfo("inc.ll", 2)).build(body)
    with osrjit.Runtime() as rt:
        rt.compile_ir(fir)
        assert rt.function("inc")(41) == 42
        if not GdbJitInterface.current().available:
            pytest.skip(GdbJitInterface.current().reason)
        # The version's own object (its site stubs' object names them too).
        [obj] = [o for o in GdbJitInterface.current().registered_objects()
                 if b"inc@v1" in o and "inc@v1" in _symbol_names(o)]
        dwarf = ELFFile(io.BytesIO(obj)).get_dwarf_info()
        names = {die.attributes["DW_AT_name"].value for cu in dwarf.iter_CUs()
                 for die in cu.iter_DIEs() if die.tag == "DW_TAG_subprogram"}
        assert names == {b"inc@v1", b"inc@v1.resume"}


# -- gdb registration, from inside --------------------------------------------------


def _symbol_names(obj):
    try:
        return {s.name for s in read_object(obj).symbols}
    except Exception:   # noqa: BLE001 - objects other JITs registered
        return set()


def _registered_names():
    names = []
    for obj in GdbJitInterface.current().registered_objects():
        try:
            names += [s.name for s in read_object(obj).symbols]
        except Exception:   # noqa: BLE001 - objects other JITs registered
            pass
    return names


def test_every_version_is_registered_with_gdb_by_version_and_withdrawn_when_freed():
    if not GdbJitInterface.current().available:
        pytest.skip(GdbJitInterface.current().reason)
    with osrjit.Runtime() as rt:
        rt.compile(FIB)
        assert _registered_names().count("fib@v1") == 1
        assert "osrjit.fn.fib" not in _registered_names()   # LLVM's entry was adopted
        rt.replace("fib", FIB)
        names = _registered_names()
        assert names.count("fib@v2") == 1 and "fib@v1" not in names   # v1 was freed
        assert "osrjit_deopt_stub" in names and "osrjit_hook" in names
    assert "fib@v2" not in _registered_names()


def test_an_object_llvm_did_not_register_gets_an_entry_of_its_own_until_withdrawn():
    gdb = GdbJitInterface.current()
    if not gdb.available:
        pytest.skip(gdb.reason)
    obj, fir = _fib_object()
    symfile = debug_object(obj, {".text": 0x1000}, {fir.symbol: "lonely@v1"})
    before = len(gdb.registered_objects())
    registration = gdb.register(symfile, None)
    objects = gdb.registered_objects()
    assert len(objects) == before + 1 and objects[0] == symfile    # at the head
    registration.release()
    assert len(gdb.registered_objects()) == before
    assert "lonely@v1" not in _registered_names()


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_gdb_registration_can_be_turned_off(how, monkeypatch):
    if how == "environment":
        monkeypatch.setenv("OSRJIT_GDB", "0")
    with osrjit.Runtime(**({"gdb": False} if how == "argument" else {})) as rt:
        rt.compile(FIB)
        assert "fib@v1" not in _registered_names()


def test_bad_perf_mode_is_a_value_error():
    with pytest.raises(ValueError, match="perf must be"):
        osrjit.Runtime(perf="flamegraph")


# -- perf map ------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["argument", "environment"])
def test_perf_map_holds_every_version_and_the_support_code(how):
    if how == "argument":
        result, _ = _scenario("fib_before_and_after", "map", "20", "1")
    else:
        result, _ = _scenario("fib_before_and_after", "env", "20", "1",
                              env={"OSRJIT_PERF": "map"})
    lines = _map_lines(result["pid"])
    by_name = {name: (int(start, 16), int(size, 16)) for start, size, name in lines}
    for label, (entry, text_start, text_end) in (("fib@v1", result["v1"]),
                                                 ("fib@v2", result["v2"])):
        start, size = by_name[label]
        assert start == entry and text_start <= start < start + size <= text_end
        assert f"{label}.resume" in by_name
    assert {"osrjit_deopt_stub", "osrjit_hook", "osrjit_entry_i64_1"} <= set(by_name)


# -- real perf runs --------------------------------------------------------------------


def _perf_or_skip(tmp_path):
    if shutil.which("perf") is None:
        pytest.skip("perf is not installed")
    probe = subprocess.run(["perf", "record", "-e", "cpu-clock", "-o",
                            str(tmp_path / "probe.data"), "--", "true"],
                           capture_output=True, text=True, timeout=TIMEOUT)
    if probe.returncode != 0:
        pytest.skip(f"perf record does not work here: {probe.stderr.strip()[-300:]}")


def _samples(data, tmp_path):
    """Symbol of every sample of ``data``, in time order."""
    script = subprocess.run(["perf", "script", "-i", str(data), "-F", "ip,sym"],
                            capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert script.returncode == 0, script.stderr
    return [line.split()[-1] for line in script.stdout.splitlines() if len(line.split()) > 1]


def _check_before_and_after(samples):
    v1 = [i for i, s in enumerate(samples) if s == "fib@v1"]
    v2 = [i for i, s in enumerate(samples) if s == "fib@v2"]
    assert v1 and v2, f"samples on fib@v1: {len(v1)}, on fib@v2: {len(v2)}"
    assert max(v1) < min(v2)        # v1 before the replace, v2 after


def _report_symbols(data, tmp_path, sort="sym"):
    report = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--sort", sort],
                            capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert report.returncode == 0, report.stderr
    return report.stdout


def test_perf_report_attributes_samples_to_both_versions_with_a_perf_map(tmp_path):
    _perf_or_skip(tmp_path)
    data = tmp_path / "perf.data"
    result, out = _scenario("fib_before_and_after", "map", "32", "3",
                            prefix=("perf", "record", "-e", "cpu-clock", "-F", "1000",
                                    "-o", str(data), "--"))
    try:
        report = _report_symbols(data, tmp_path)
        assert re.search(r"\[\.\] fib@v1\b", report) and re.search(r"\[\.\] fib@v2\b", report)
        _check_before_and_after(_samples(data, tmp_path))
    finally:
        _map_lines(result["pid"])


@pytest.mark.slow        # ~40 s of perf record + perf inject; the perf map test runs in CI
def test_perf_inject_jit_attributes_samples_to_both_versions_with_a_jitdump(tmp_path):
    _perf_or_skip(tmp_path)
    data, injected = tmp_path / "perf.data", tmp_path / "perf.jit.data"
    result, _ = _scenario("fib_before_and_after", "jitdump", "32", "3",
                          prefix=("perf", "record", "-k", "mono", "-e", "cpu-clock",
                                  "-F", "1000", "-o", str(data), "--"),
                          env={"OSRJIT_JITDUMP_DIR": str(tmp_path)})
    dump = tmp_path / f"jit-{result['pid']}.dump"
    magic, version, header_size = struct.unpack_from("<III", dump.read_bytes())
    assert (magic, version, header_size) == (0x4A695444, 1, 40)
    inject = subprocess.run(["perf", "inject", "--jit", "-i", str(data), "-o", str(injected)],
                            capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path)
    assert inject.returncode == 0, inject.stderr
    report = _report_symbols(injected, tmp_path)
    assert re.search(r"\[\.\] fib@v1\b", report) and re.search(r"\[\.\] fib@v2\b", report)
    _check_before_and_after(_samples(injected, tmp_path))
    # The line tables went along (JIT_CODE_DEBUG_INFO): samples have source lines.
    lines = _report_symbols(injected, tmp_path, "sym,srcline")
    assert re.search(r"\[\.\] fib@v[12]\s+fib\.py:[1-9]", lines), lines[-3000:]


# -- a real gdb session ------------------------------------------------------------------


def test_gdb_backtrace_after_a_replacement_names_versions_and_lines_and_reaches_start():
    if shutil.which("gdb") is None:
        pytest.skip("gdb is not installed")
    if not GdbJitInterface.current().available:
        pytest.skip(GdbJitInterface.current().reason)
    result, out = _scenario(
        "gdb_after_replace",
        prefix=("gdb", "-batch", "-nx", "-ex", "set pagination off",
                "-ex", "set breakpoint pending on", "-ex", "break getppid",
                "-ex", "run", "-ex", "bt", "-ex", "continue", "--args"))
    assert result == {"first": 7, "second": 7}
    bt = [line for line in out.splitlines() if re.match(r"#\d+ ", line)]
    assert bt, out[-3000:]
    text = "\n".join(bt)
    # The frames below the hook: three of down@v2 (hook call at line 3,
    # recursive calls at line 4 of the replacement) and g@v1 (line 7).
    assert re.search(r" in down@v2 \(\) at /srv/prog_v2\.py:3$", text, re.M), text
    assert len(re.findall(r" in down@v2 \(\) at /srv/prog_v2\.py:4$", text, re.M)) == 3, text
    assert re.search(r" in g@v1 \(\) at /srv/prog\.py:7$", text, re.M), text
    assert "osrjit.fn" not in text
    assert re.search(r" in _start \(\)", bt[-1]), text
