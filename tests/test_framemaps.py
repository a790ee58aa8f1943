"""Frame maps: stackmap records paired with sites, checked against the machine code.

These tests never run JIT code: objects are emitted with the runtime's
pipeline and "loaded" at made-up addresses, which is all a frame map needs.
"""
import dataclasses
import gc
import re
import shutil
import subprocess

import pytest

import handir
from deopt import FrameMapError, IncompatibleVersion
from deopt import framemaps as fm
from deopt.stackmaps import LocationKind
from osrjit.abi import FunctionIR, LiveValue, SiteInfo, SiteKind
from osrjit.compiling import emit_object, target_machine

TEXT_AT = 0x7F00_0000_0000     # where we pretend .text was loaded
READOBJ = shutil.which("llvm-readobj-14") or shutil.which("llvm-readobj")


@pytest.fixture(scope="module")
def tm():
    machine = target_machine(2)
    yield machine
    machine.close()


@pytest.fixture(autouse=True)
def no_garbage():
    yield
    gc.collect()
    assert gc.garbage == []


def load(ir, tm, at=TEXT_AT):
    obj = emit_object(ir, tm, 2)
    return obj, fm.ObjectImage(obj, {".text": at}, name=ir.name)


def maps_of(ir, tm, version=1):
    obj, image = load(ir, tm)
    return image, fm.frame_maps_for_object(image, ir.sites, function=ir.name, version=version)


# --------------------------------------------------------------------------
# x86-64 call decoding
# --------------------------------------------------------------------------

@pytest.mark.parametrize("code, direct", [
    (bytes.fromhex("e8 78 56 34 12"), True),            # call rel32
    (bytes.fromhex("ff d0"), False),                    # call *%rax          (mod=11 rm=000)
    (bytes.fromhex("41 ff d3"), False),                 # call *%r11          (REX.B)
    (bytes.fromhex("ff 10"), False),                    # call *(%rax)        (mod=00)
    (bytes.fromhex("ff 15 00 00 00 00"), False),        # call *0(%rip)       (mod=00 rm=101)
    (bytes.fromhex("ff 50 08"), False),                 # call *8(%rax)       (mod=01 disp8)
    (bytes.fromhex("41 ff 54 24 08"), False),           # call *8(%r12)       (SIB + disp8)
    (bytes.fromhex("ff 14 25 00 10 00 00"), False),     # call *0x1000        (SIB, no base, disp32)
    (bytes.fromhex("ff 90 00 01 00 00"), False),        # call *0x100(%rax)   (mod=10 disp32)
    (bytes.fromhex("42 ff 94 c8 00 01 00 00"), False),  # call *0x100(%rax,%r9,8) (REX.X, SIB)
])
def test_call_forms_decode(code, direct):
    # Preceded by unrelated bytes, the call is still found ending at the end.
    padded = bytes.fromhex("48 89 c7 90") + code
    calls = fm.decode_call_ending_at(padded, len(padded))
    assert any(c.direct == direct and c.start == 4 for c in calls), calls


@pytest.mark.parametrize("code", [
    bytes.fromhex("ff e0"),             # jmp *%rax (/4, not /2)
    bytes.fromhex("ff d0 90"),          # call *%rax; nop: ends one byte early
    bytes.fromhex("48 89 c7"),          # mov %rax,%rdi
    bytes.fromhex("ff 50"),             # call *disp8(%rax) missing its disp8
])
def test_non_calls_do_not_decode(code):
    assert fm.decode_call_ending_at(code, len(code)) == []


# --------------------------------------------------------------------------
# Records of emitted objects
# --------------------------------------------------------------------------

@pytest.mark.parametrize("make", [handir.fib, handir.kinds, handir.locs])
def test_every_record_is_a_return_address(make, tm):
    ir = make()
    image, table = maps_of(ir, tm)
    (text,) = image.code_sections()
    assert len(table) > 0
    for m in table:
        end = m.return_address - TEXT_AT
        assert fm._verify_call(text, end) is not None, m
        assert text.load_address < m.return_address <= text.end_address
        assert m.symbol in (ir.symbol, ir.resume_symbol)
        assert table.at(m.return_address) is m
        assert m in table.for_site(m.site_id)
        assert [v.name for v in m.values] == [v.name for v in ir.sites[m.site_id].live]


def test_fib_sites_one_direct_one_indirect(tm):
    ir = handir.fib()
    image, table = maps_of(ir, tm)
    (text,) = image.code_sections()

    def call(m):
        return fm._verify_call(text, m.return_address - TEXT_AT)

    # Site 1 calls @fib directly (E8 + PLT32); site 2 through the slot (FF /2).
    assert {call(m).direct for m in table.for_site(1)} == {True}
    assert {call(m).direct for m in table.for_site(2)} == {False}
    # Site 2 is reached from the entry and from the resume entry.
    assert {m.symbol for m in table.for_site(2)} == {"fib", "fib__resume"}
    assert all(m.kind is SiteKind.CALL and m.has_result for m in table)


def test_location_kinds(tm):
    _, table = maps_of(handir.locs(), tm)
    (m,) = table.maps
    kinds = {v.name: v.location.kind for v in m.values}
    assert kinds == {"x": LocationKind.INDIRECT, "buf": LocationKind.DIRECT,
                     "seven": LocationKind.CONSTANT, "big": LocationKind.CONSTANT_INDEX}
    by_name = {v.name: v for v in m.values}
    assert by_name["seven"].location.value == 7
    assert by_name["big"].location.value == handir.BIG
    assert by_name["buf"].type == "ptr"
    assert by_name["x"].location.dwarf_reg == 7            # rsp-relative spill slot
    assert m.stack_size is not None and m.function_address == TEXT_AT


def test_call_resolved_inside_the_object(tm):
    """An E8 without relocation counts only if it targets a function's start."""
    ir_text = """
declare token @llvm.experimental.gc.statepoint.p0(i64, i32, ptr, i32, i32, ...)
declare i64 @llvm.experimental.gc.result.i64(token)
define internal i64 @helper(i64 %x) noinline { %y = mul i64 %x, 3
  ret i64 %y }
define i64 @f(i64 %x) gc "statepoint-example" {
  %t = call token (i64, i32, ptr, i32, i32, ...) @llvm.experimental.gc.statepoint.p0(i64 9, i32 0, ptr elementtype(i64 (i64)) @helper, i32 1, i32 0, i64 %x, i32 0, i32 0) [ "deopt"(i64 %x) ]
  %r = call i64 @llvm.experimental.gc.result.i64(token %t)
  %s = add i64 %r, %x
  ret i64 %s }
define i64 @f__resume(i64 %site, ptr %state) { %r = load i64, ptr %state
  ret i64 %r }
"""
    ir = FunctionIR("f", ("x",), ir_text, "f",
                    {9: SiteInfo(9, SiteKind.EXTERNAL, None, (LiveValue("x"),))})
    image, table = maps_of(ir, tm)
    (text,) = image.code_sections()
    (m,) = table.maps
    end = m.return_address - TEXT_AT
    call = fm._verify_call(text, end)
    assert call.direct and end - 4 not in text.call_relocations
    assert text.functions[call.target] == "helper"
    # Point the rel32 one byte past helper's start: no longer credible.
    bad = bytearray(text.data)
    rel = int.from_bytes(bad[end - 4:end], "little", signed=True) + 1
    bad[end - 4:end] = rel.to_bytes(4, "little", signed=True)
    forged = dataclasses.replace(text, data=bytes(bad))
    assert fm._verify_call(forged, end) is None


def test_fake_record_offset_is_refused(tm):
    ir = handir.kinds()
    _, image = load(ir, tm)
    stackmap = image.parse_stackmap()
    record = stackmap.records[1]
    fake = dataclasses.replace(record, offset=record.offset + 1)
    forged = dataclasses.replace(stackmap, records=(stackmap.records[0], fake,
                                                     *stackmap.records[2:]))
    with pytest.raises(FrameMapError) as err:
        fm.build_frame_maps(ir.sites, forged, image.code_sections(), function="kinds",
                            version=4)
    msg = str(err.value)
    assert "kinds (version 4, kinds)" in msg
    assert f"site {record.id} at offset {record.offset + 1:#x}" in msg
    assert "not the return address of a call instruction" in msg


def test_corrupted_code_is_refused(tm):
    """NOPs over the call before a record's return address: the record no longer fits."""
    ir = handir.fib()
    obj, image = load(ir, tm)
    (m,) = [m for m in fm.frame_maps_for_object(image, ir.sites, function="fib", version=1)
            if m.site_id == 2 and m.symbol == "fib"]
    text = image.object.section(".text")
    at = text.offset + (m.return_address - TEXT_AT)
    corrupted = bytearray(obj)
    corrupted[at - 2:at] = b"\x90\x90"              # was ff d0 (call *%rax)
    image2 = fm.ObjectImage(bytes(corrupted), {".text": TEXT_AT})
    with pytest.raises(FrameMapError, match=r"fib \(version 1, fib\): site 2 at offset"):
        fm.frame_maps_for_object(image2, ir.sites, function="fib", version=1)


def test_record_and_site_must_agree(tm):
    ir = handir.fib()
    _, image = load(ir, tm)
    too_many = dict(ir.sites)
    too_many[2] = dataclasses.replace(ir.sites[2], live=(LiveValue("a"), LiveValue("extra")))
    with pytest.raises(FrameMapError, match=r"site 2 .* 1 deopt values but the site lists 2"):
        fm.frame_maps_for_object(image, too_many, function="fib", version=1)
    missing = {1: ir.sites[1]}
    with pytest.raises(FrameMapError, match=r"site 2 .*no such site"):
        fm.frame_maps_for_object(image, missing, function="fib", version=1)


def test_load_addresses_from_symbols(tm):
    ir = handir.fib()
    obj = emit_object(ir, tm, 2)
    image = fm.ObjectImage(obj, {})
    resume_value = next(s.value for s in image.object.symbols if s.name == "fib__resume")
    got = fm.ObjectImage.infer_load_addresses(obj, {"fib": 0x5000,
                                                     "fib__resume": 0x5000 + resume_value})
    assert got == {".text": 0x5000}
    with pytest.raises(FrameMapError, match="implies load address"):
        fm.ObjectImage.infer_load_addresses(obj, {"fib": 0x5000, "fib__resume": 0x9000})
    assert set(image.undefined_symbols) == {"osrjit.slot.fib"}


# --------------------------------------------------------------------------
# Agreement with llvm-readobj
# --------------------------------------------------------------------------

_READOBJ_LOCATION = re.compile(
    r"#\d+: (?:Register R#(?P<reg>\d+)|Direct R#(?P<dreg>\d+) \+ (?P<doff>-?\d+)"
    r"|Indirect \[R#(?P<ireg>\d+) \+ (?P<ioff>-?\d+)\]|Constant (?P<const>-?\d+)"
    r"|ConstantIndex #(?P<idx>\d+) \((?P<cval>\d+)\)), size: (?P<size>\d+)")


def _readobj_records(path):
    out = subprocess.run([READOBJ, "--stackmap", str(path)], capture_output=True, text=True,
                         check=True).stdout
    records = []
    for line in out.splitlines():
        line = line.strip()
        m = re.match(r"Record ID: (\d+), instruction offset: (\d+)", line)
        if m:
            records.append((int(m[1]), int(m[2]), []))
            continue
        m = _READOBJ_LOCATION.match(line)
        if m and records:
            if m["reg"]:
                loc = (LocationKind.REGISTER, int(m["reg"]), 0)
            elif m["dreg"]:
                loc = (LocationKind.DIRECT, int(m["dreg"]), int(m["doff"]))
            elif m["ireg"]:
                loc = (LocationKind.INDIRECT, int(m["ireg"]), int(m["ioff"]))
            elif m["const"]:
                loc = (LocationKind.CONSTANT, 0, int(m["const"]))
            else:
                loc = (LocationKind.CONSTANT_INDEX, 0, int(m["cval"]))
            records[-1][2].append(loc + (int(m["size"]),))
    return records


@pytest.mark.skipif(READOBJ is None, reason="llvm-readobj not installed")
@pytest.mark.parametrize("make", [handir.fib, handir.kinds, handir.locs])
def test_decoding_agrees_with_llvm_readobj(make, tm, tmp_path):
    ir = make()
    obj, image = load(ir, tm)
    path = tmp_path / f"{ir.name}.o"
    path.write_bytes(obj)
    ours = []
    for r in image.parse_stackmap().records:
        locs = []
        for loc in r.locations:
            if loc.kind is LocationKind.CONSTANT_INDEX:
                locs.append((loc.kind, 0, loc.constant, loc.size))
            elif loc.kind is LocationKind.CONSTANT:
                locs.append((loc.kind, 0, loc.offset, loc.size))
            elif loc.kind is LocationKind.REGISTER:
                locs.append((loc.kind, loc.dwarf_reg, 0, loc.size))
            else:
                locs.append((loc.kind, loc.dwarf_reg, loc.offset, loc.size))
        ours.append((r.id, r.offset, locs))
    assert ours == _readobj_records(path)


# --------------------------------------------------------------------------
# Compatibility
# --------------------------------------------------------------------------

def _site(sid, *live, has_result=True, kind=SiteKind.CALL):
    return SiteInfo(sid, kind, "g", tuple(LiveValue(*v) if isinstance(v, tuple) else LiveValue(v)
                                         for v in live), has_result=has_result)


def _old_maps(*sites):
    """Frame maps as a version with ``sites`` would have them (two copies per site)."""
    loc = fm.Location(LocationKind.INDIRECT, 8, 7, 8)
    maps = []
    for i, s in enumerate(sites):
        for copy in range(2):
            maps.append(fm.FrameMap("f", 1, s.id, s.kind, 0x1000 + 16 * i + copy,
                                    tuple(fm.LiveSlot(v.name, v.type, loc) for v in s.live),
                                    s.has_result))
    return maps


def test_compatible_same_and_fewer_values():
    old = _old_maps(_site(1, "n", "acc"), _site(2, "n"))
    fm.check_compatible(old, {1: _site(1, "n", "acc"), 2: _site(2, "n")})
    # The new version may need fewer values, in any order, and may add sites.
    fm.check_compatible(old, {1: _site(1, "acc"), 2: _site(2), 3: _site(3, "zz")})
    # A result the new code ignores is fine.
    fm.check_compatible(old, {1: _site(1, "n", has_result=False), 2: _site(2, "n")})


def test_incompatible_missing_site():
    old = _old_maps(_site(1, "n"), _site(2, "n"))
    with pytest.raises(IncompatibleVersion, match="site 2 .*no resume entry") as err:
        fm.check_compatible(old, {1: _site(1, "n")})
    assert err.value.site_id == 2


def test_incompatible_missing_value():
    old = _old_maps(_site(4, "n", "i"))
    with pytest.raises(IncompatibleVersion) as err:
        fm.check_compatible(old, {4: _site(4, "n", "i", "acc")})
    assert err.value.site_id == 4
    assert "needs 'acc' (i64) which the old frame does not provide" in str(err.value)
    assert "old provides ['i', 'n']" in str(err.value)


def test_incompatible_type():
    old = _old_maps(_site(1, ("x", "i64")))
    with pytest.raises(IncompatibleVersion, match="type of 'x' differs: old i64, new double"):
        fm.check_compatible(old, {1: _site(1, ("x", "double"))})


def test_incompatible_needs_result():
    old = _old_maps(_site(1, "n", has_result=False, kind=SiteKind.POLL))
    with pytest.raises(IncompatibleVersion, match="uses the call's result but the old site"):
        fm.check_compatible(old, {1: _site(1, "n", has_result=True)})


def test_lowest_incompatible_site_is_reported_with_all_differences():
    old = _old_maps(_site(3, "a"), _site(7, ("b", "i64")))
    with pytest.raises(IncompatibleVersion) as err:
        fm.check_compatible(old, {7: _site(7, ("b", "i32"), "c")})
    assert err.value.site_id == 3
    with pytest.raises(IncompatibleVersion) as err:
        fm.check_compatible(old, {3: _site(3, "a"), 7: _site(7, ("b", "i32"), "c")})
    assert err.value.site_id == 7
    assert "'c'" in err.value.reason and "'b' differs" in err.value.reason
