"""Direct calls retargeted by patching (osrjit.native.patching) and the direct call mode
of the code generators.

Native scenarios run in child processes (``run_child``) and return plain data
that the tests assert on. Programs are reference-language sources compiled
with ``calls="direct"`` and linked one library per version by
``direct_loader.DirectLoader``.
"""
import ctypes
import re

import pytest
from llvmlite import ir

from childproc import run_child
from osrjit.native import patching
from osrjit.abi import CALLS_DIRECT, DIRECT_CALL_PREFIX, direct_call_symbol
from osrjit.errors import (CallTargetOutOfRange, CompileError, NotACallSite, OsrJitError,
                           PatchError, UnpatchableReference)
from osrjit.ir import I64, SYMBOL_PREFIX, VersionedFunction
from osrjit.lang import compile_source

G1 = "def g(x):\n    return x + 1\n"
G2 = "def g(x):\n    return x + 100\n"
# f(n) = sum over k = n..1 of g(k); recursion is a self-call.
F = "def f(n):\n    if n <= 0:\n        return 0\n    return g(n) + f(n - 1)\n"
SELF1 = "def r(n):\n    if n <= 0:\n        return 0\n    return r(n - 1) + 1\n"
SELF2 = "def r(n):\n    if n <= 0:\n        return 0\n    return r(n - 1) + 100\n"
EVEN_ODD = """
def is_even(n):
    if n == 0:
        return 1
    return is_odd(n - 1)

def is_odd(n):
    if n == 0:
        return 0
    return is_even(n - 1)
"""
HOOKED = "def h(n):\n    a = hook(n)\n    return a + g(n)\n"


def _direct(source, **known):
    return compile_source(source, known=known, calls=CALLS_DIRECT)


def _f_expected(n, add):
    return sum(k + add for k in range(1, n + 1))


# --------------------------------------------------------------------------
# Code generation (no native code runs)
# --------------------------------------------------------------------------


def _emit(fir):
    """The object the runtime would link for ``fir`` (nothing is loaded or run)."""
    from osrjit.compiling import emit_object, target_machine
    tm = target_machine()
    try:
        return emit_object(fir, tm)
    finally:
        tm.close()


def test_one_prefix_names_definitions_and_direct_calls():
    assert SYMBOL_PREFIX == DIRECT_CALL_PREFIX == "osrjit.fn."
    assert direct_call_symbol("g") == "osrjit.fn.g"


def test_direct_mode_declares_the_callee_and_calls_it_from_the_statepoint():
    [f] = _direct(F, g=1)
    assert f.direct_callees == frozenset({"g"}) and f.callees == frozenset({"g"})
    assert 'declare i64 @"osrjit.fn.g"(i64' in f.module_ir
    assert "osrjit.slot." not in f.module_ir
    statepoints = [l for l in f.module_ir.splitlines() if "gc.statepoint.p0\"(i64" in l
                   and "call token" in l]
    assert any('elementtype(i64 (i64)) @"osrjit.fn.g"' in l for l in statepoints)


def test_slot_mode_is_the_default_and_unchanged():
    [f] = compile_source(F, known={"g": 1})
    assert f.direct_callees == frozenset() and f.callees == frozenset({"g"})
    assert '@"osrjit.slot.g"' in f.module_ir
    assert '@"osrjit.fn.g"' not in f.module_ir
    # Site ids do not depend on the call mode.
    [d] = _direct(F, g=1)
    assert {i: (s.kind, s.callee, s.live) for i, s in f.sites.items()} == \
           {i: (s.kind, s.callee, s.live) for i, s in d.sites.items()}


def test_bad_call_mode_is_rejected():
    with pytest.raises(ValueError, match="calls="):
        compile_source(F, known={"g": 1}, calls="trampoline")
    with pytest.raises(CompileError, match="calls="):
        VersionedFunction("f", ["n"], calls="trampoline")


def test_per_call_override_and_mixed_modes():
    def body(fb):
        b = fb.builder
        a = fb.call_function(1, "g", [fb.load("n")], live=["n"])            # default: direct
        fb.declare("a")
        fb.store("a", a)
        c = fb.call_function(2, "k", [fb.load("n")], live=["a"], calls="slot")
        b.ret(b.add(fb.load("a"), c))

    fir = VersionedFunction("f", ["n"], calls="direct").build(body)
    assert fir.callees == frozenset({"g", "k"}) and fir.direct_callees == frozenset({"g"})
    assert '@"osrjit.fn.g"' in fir.module_ir and '@"osrjit.slot.k"' in fir.module_ir
    with pytest.raises(CompileError, match="calls="):
        VersionedFunction("f", ["n"]).build(
            lambda fb: fb.call_function(1, "g", [fb.load("n")], calls="jump"))


def test_direct_object_has_plt32_calls_to_the_callee_and_to_itself():
    [f] = _direct(F, g=1)
    obj = _emit(f)
    sites = patching.call_sites(obj, {".text": 0x10000}, ["osrjit.fn.g", "osrjit.fn.f"])
    g_sites, f_sites = sites["osrjit.fn.g"], sites["osrjit.fn.f"]
    assert g_sites and f_sites        # self-calls carry a PLT32 relocation too
    for s in g_sites + f_sites:
        assert s.opcode == patching.CALL_OPCODE and s.relocation_type == 4   # R_X86_64_PLT32
        assert s.rel32_address == s.instruction_address + 1
        assert s.function in ("osrjit.fn.f", "osrjit.fn.f__resume")
    assert {s.function for s in f_sites} == {"osrjit.fn.f", "osrjit.fn.f__resume"}
    assert patching.direct_call_sites(obj, {".text": 0x10000}, "osrjit.fn.g") == g_sites
    # Not loaded -> no sites; a symbol nobody calls -> none.
    assert patching.call_sites(obj, {}, ["osrjit.fn.g"]) == {"osrjit.fn.g": []}
    assert patching.direct_call_sites(obj, {".text": 0}, "osrjit.fn.nothing") == []
    # In slot mode the object never references osrjit.fn.g.
    [slot_f] = compile_source(F, known={"g": 1})
    assert patching.direct_call_sites(_emit(slot_f), {".text": 0}, "osrjit.fn.g") == []


def test_taking_the_address_of_a_direct_callee_is_unpatchable():
    def body(fb):
        g = fb.direct_callee("g", ir.FunctionType(I64, [I64]))
        fb.builder.ret(fb.builder.ptrtoint(g, I64))

    fir = VersionedFunction("taker", ["n"]).build(body)
    obj = _emit(fir)
    with pytest.raises(UnpatchableReference, match="not the rel32 of an E8/E9 call") as e:
        patching.direct_call_sites(obj, {".text": 0x1000}, "osrjit.fn.g")
    assert e.value.relocation_type == 42          # R_X86_64_REX_GOTPCRELX: a GOT load
    assert isinstance(e.value, PatchError) and isinstance(e.value, OsrJitError)
    assert patching.direct_call_sites(obj, {".text": 0x1000}, "osrjit.fn.g", strict=False) == []


def test_unmapped_memory_is_an_error_not_a_crash():
    with pytest.raises(PatchError, match="not mapped"):
        patching.patch_pointer(0x10, 0)
    site = patching.CallSite("osrjit.fn.g", 0x20, 0x21)
    with pytest.raises(PatchError, match="not mapped"):
        patching.patch_rel32(site, 0x1000)


def test_memory_map_reads_protections():
    mm = patching.MemoryMap.current()
    buf = ctypes.create_string_buffer(16)
    region = mm.region(ctypes.addressof(buf))
    assert region is not None and region.readable and region.writable
    assert region.protection & patching.PROT_WRITE
    code = mm.region(ctypes.cast(ctypes.CDLL(None).abort, ctypes.c_void_p).value)
    assert code.executable and not code.writable


# --------------------------------------------------------------------------
# Native scenarios (run in a child)
# --------------------------------------------------------------------------


def _maps_at(address):
    r = patching.MemoryMap.current().region(address)
    return r.perms if r else None


def _rwx():
    return {(r.start, r.end) for r in patching.MemoryMap.current().writable_executable()}


def scenario_caller_retarget():
    from direct_loader import DirectLoader
    out = {}
    loader = DirectLoader()
    [g1], [g2], [f] = _direct(G1), _direct(G2), _direct(F, g=1)
    G1v = loader.load_version(g1)
    Fv = loader.load_version(f)                  # imports osrjit.fn.g = g v1's entry
    out["v1"] = Fv.call(5)
    index = patching.CallSiteIndex()
    added = index.add("f.v0", Fv.obj, Fv.load_addresses, patching.callee_symbols(f))
    out["callees"] = sorted(index.callees())
    out["n_g_sites"] = len(index.sites("g"))
    # How JITLink linked them: calls to the imported symbol through a stub,
    # self-calls directly.
    out["link_g"] = [(r.kind.value, r.final_target == G1v.entry, r.stub == r.target,
                      patching.MemoryMap.current().region(r.got).perms)
                     for _, r in index.resolutions("g")]
    out["link_f"] = [(r.kind.value, r.target == Fv.entry) for _, r in index.resolutions("f")]
    out["stubs_shared"] = len({s.stub for s in added if s.callee == "g"})
    page_before = _maps_at(Fv.entry)
    rwx_before = _rwx()
    # Bypass the stub: the rel32 now reaches g v1 itself.
    patches = index.retarget("g", G1v.entry)
    out["bypass_patches"] = [p.kind for p in patches]
    out["after_bypass"] = [(r.kind.value, r.target == G1v.entry) for _, r in index.resolutions("g")]
    out["bypass_value"] = Fv.call(5)
    out["again_patches"] = len(index.retarget("g", G1v.entry))     # nothing left to do
    # New version of g: f runs it without being recompiled.
    G2v = loader.load_version(g2)
    patches = index.retarget("g", G2v.entry)
    out["v2_patches"] = sorted(p.kind for p in patches)
    out["v2"] = Fv.call(5)
    out["after_v2"] = [(r.kind.value, r.target == G2v.entry) for _, r in index.resolutions("g")]
    got = index.sites("g")[0].got
    out["got_follows"] = ctypes.c_uint64.from_address(got).value == G2v.entry
    out["reaching_g1"] = len(index.sites_reaching(*G1v.text_range))
    out["reaching_g2"] = len(index.sites_reaching(*G2v.text_range))
    out["page"] = (page_before, _maps_at(Fv.entry))
    out["rwx_unchanged"] = _rwx() == rwx_before
    out["rwx_over_code"] = [r for r in _rwx() if r[0] < Fv.text_range[1] and Fv.text_range[0] < r[1]]
    # Undo: back to g v1.
    patching.apply_patches([p.undo() for p in reversed(patches)])
    out["undone"] = Fv.call(5)
    index.remove("f.v0")
    out["removed"] = ("f.v0" in index, index.sites("g"))
    loader.close()
    return out


def test_caller_reaches_the_new_version_without_recompiling():
    out = run_child(scenario_caller_retarget)
    assert out["v1"] == _f_expected(5, 1)
    assert out["callees"] == ["f", "g"] and out["n_g_sites"] >= 1
    # JITLink routes calls to an imported absolute symbol through a stub whose GOT
    # entry is writable; one stub serves every site of the symbol.
    assert all(k == "stub" and final and at_stub for k, final, at_stub, _ in out["link_g"])
    assert all(perms.startswith("rw") for *_, perms in out["link_g"])
    assert out["stubs_shared"] == 1
    assert all(l == ("direct", True) for l in out["link_f"])
    assert set(out["bypass_patches"]) == {"rel32"}
    assert all(a == ("direct", True) for a in out["after_bypass"])
    assert out["bypass_value"] == out["v1"]
    assert out["again_patches"] == 0
    assert out["v2_patches"].count("pointer") == 1
    assert out["v2"] == _f_expected(5, 100)
    assert all(a == ("direct", True) for a in out["after_v2"])
    assert out["got_follows"]
    assert out["reaching_g1"] == 0 and out["reaching_g2"] == out["n_g_sites"]
    assert out["page"] == ("r-xp", "r-xp")
    assert out["rwx_unchanged"] and out["rwx_over_code"] == []
    assert out["undone"] == _f_expected(5, 1)
    assert out["removed"] == (False, ())


def scenario_self_calls():
    from direct_loader import DirectLoader
    loader = DirectLoader()
    [r1], [r2] = _direct(SELF1), _direct(SELF2)
    R1, R2 = loader.load_version(r1), loader.load_version(r2)
    index = patching.CallSiteIndex()
    index.add(1, R1.obj, R1.load_addresses, patching.callee_symbols(r1))
    index.add(2, R2.obj, R2.load_addresses, patching.callee_symbols(r2))
    out = {"before": (R1.call(3), R2.call(3))}
    out["link"] = [(s.owner, r.kind.value, r.target == (R1 if s.owner == 1 else R2).entry)
                   for s, r in index.resolutions("r")]
    out["functions"] = sorted({s.site.function for s in index.sites("r")})
    patches = index.retarget("r", R2.entry)
    out["patched_owners"] = sorted({p.site.function for p in patches})
    out["patched_in_v1_only"] = all(R1.text_range[0] <= p.address < R1.text_range[1]
                                    for p in patches)
    out["after"] = (R1.call(3), R2.call(3))
    loader.close()
    return out


def test_self_calls_of_an_old_version_reach_the_new_version():
    out = run_child(scenario_self_calls)
    assert out["before"] == (3, 300)
    assert all(kind == "direct" and at_own_entry for _, kind, at_own_entry in out["link"])
    assert out["functions"] == ["osrjit.fn.r", "osrjit.fn.r__resume"]
    assert out["patched_in_v1_only"]
    assert "osrjit.fn.r" in out["patched_owners"]
    # v1's body runs once (+1), then its recursive call enters v2 (2 levels of +100).
    assert out["after"] == (201, 300)


def scenario_mutual_recursion():
    """Two libraries, one batch: link is_even first with a placeholder for
    is_odd (libc abort), then is_odd against is_even's entry, then retarget
    both callees (which also bypasses the stubs)."""
    from direct_loader import DirectLoader
    loader = DirectLoader()
    even, odd = _direct(EVEN_ODD)
    placeholder = patching.placeholder_address()
    E = loader.load_version(even, direct={"is_odd": placeholder})
    O = loader.load_version(odd)
    index = patching.CallSiteIndex()
    for fir, v in ((even, E), (odd, O)):
        index.add(fir.name, v.obj, v.load_addresses, patching.callee_symbols(fir))
    out = {"placeholder_linked": [r.final_target == placeholder
                                  for _, r in index.resolutions("is_odd")]}
    index.retarget("is_odd", O.entry)
    index.retarget("is_even", E.entry)
    out["resolved"] = [(s.owner, r.kind.value) for callee in ("is_even", "is_odd")
                       for s, r in index.resolutions(callee)]
    out["even"] = [E.call(k) for k in (0, 1, 10, 31)]
    out["odd"] = [O.call(k) for k in (0, 1, 10, 31)]
    loader.close()
    return out


def test_mutual_recursion_in_direct_mode():
    out = run_child(scenario_mutual_recursion)
    assert out["placeholder_linked"] and all(out["placeholder_linked"])
    assert all(kind == "direct" for _, kind in out["resolved"])
    assert {owner for owner, _ in out["resolved"]} == {"is_even", "is_odd"}
    assert out["even"] == [1, 0, 1, 0]
    assert out["odd"] == [0, 1, 0, 1]


def _far_function(addend):
    """``i64 (i64 x) { return x + addend }`` on a page mapped >2 GiB from the JIT
    (mapped RW, written, then made RX). Returns its address or None."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    map_private_anonymous, map_fixed_noreplace = 0x22, 0x100000
    for hint in (0x100000000000, 0x200000000000, 0x300000000000):
        p = libc.mmap(hint, 4096, 3, map_private_anonymous | map_fixed_noreplace, -1, 0)
        if p == hint:
            break
    else:
        return None
    code = b"\x48\x8d\x87" + addend.to_bytes(4, "little") + b"\xc3"   # lea rax,[rdi+a]; ret
    ctypes.memmove(p, code, len(code))
    assert libc.mprotect(p, 4096, 5) == 0
    return p


def scenario_far_targets():
    from direct_loader import DirectLoader
    loader = DirectLoader()
    [g1], [f] = _direct(G1), _direct(F, g=1)
    G1v = loader.load_version(g1)
    Fv = loader.load_version(f)
    far = _far_function(7000)
    assert far is not None and abs(far - Fv.entry) > 1 << 32
    index = patching.CallSiteIndex()
    index.add("f", Fv.obj, Fv.load_addresses, patching.callee_symbols(f))
    index.retarget("g", G1v.entry)                        # bypassed: direct to g v1
    out = {"near": Fv.call(4)}
    # Out of range for the rel32, but the linker's stub can still reach it: the
    # GOT entry is rewritten and the rel32 points back at the stub.
    patches = index.retarget("g", far)
    out["far_patches"] = sorted(p.kind for p in patches)
    out["far_resolved"] = [(r.kind.value, r.final_target == far, r.target == s.stub)
                           for s, r in index.resolutions("g")]
    out["far"] = Fv.call(4)
    index.retarget("g", G1v.entry)
    out["back"] = Fv.call(4)
    # Self-calls have no stub: out of range is an error, and nothing is written.
    text = ctypes.string_at(Fv.text_range[0], Fv.text_range[1] - Fv.text_range[0])
    try:
        index.retarget("f", far)
        out["self_far"] = None
    except CallTargetOutOfRange as e:
        out["self_far"] = (e.target == far, not patching.fits_rel32(e.displacement),
                           str(e))
    site = index.sites("f")[0].site
    try:
        patching.patch_rel32(site, far)
        out["rel32_far"] = None
    except CallTargetOutOfRange as e:
        out["rel32_far"] = e.address == site.instruction_address
    out["unchanged"] = ctypes.string_at(Fv.text_range[0], len(text)) == text
    out["still"] = Fv.call(4)
    loader.close()
    return out


def test_targets_beyond_rel32_range_go_through_the_stub_or_raise():
    out = run_child(scenario_far_targets)
    assert out["near"] == _f_expected(4, 1)
    assert out["far_patches"].count("pointer") == 1 and "rel32" in out["far_patches"]
    assert all(r == ("stub", True, True) for r in out["far_resolved"])
    assert out["far"] == _f_expected(4, 7000)
    assert out["back"] == _f_expected(4, 1)
    assert out["self_far"] is not None and out["self_far"][:2] == (True, True)
    assert "no stub" in out["self_far"][2]
    assert out["rel32_far"] is True
    assert out["unchanged"] and out["still"] == _f_expected(4, 1)


def scenario_not_a_call():
    from direct_loader import DirectLoader
    loader = DirectLoader()
    [g1] = _direct(G1)
    G = loader.load_version(g1)
    out = {}
    head = ctypes.string_at(G.entry, 8)
    bogus = patching.CallSite("osrjit.fn.g", G.entry, G.entry + 1)   # the function's first bytes
    try:
        patching.patch_rel32(bogus, G.entry)
        out["error"] = None
    except NotACallSite as e:
        out["error"] = (e.address == G.entry, e.found[:1] == head[:1], str(e))
    out["unchanged"] = ctypes.string_at(G.entry, 8) == head
    out["page"] = _maps_at(G.entry)
    out["still"] = G.call(1)
    loader.close()
    return out


def test_patching_bytes_that_are_not_a_call_raises():
    out = run_child(scenario_not_a_call)
    assert out["error"] is not None and out["error"][:2] == (True, True)
    assert "expected 0xe8" in out["error"][2]
    assert out["unchanged"] and out["page"] == "r-xp" and out["still"] == 2


def scenario_write_is_never_rwx():
    """Observe the page's protection at the moment of each store."""
    from direct_loader import DirectLoader
    loader = DirectLoader()
    [g1], [g2], [f] = _direct(G1), _direct(G2), _direct(F, g=1)
    G1v = loader.load_version(g1)
    Fv = loader.load_version(f)
    G2v = loader.load_version(g2)
    index = patching.CallSiteIndex()
    index.add("f", Fv.obj, Fv.load_addresses, patching.callee_symbols(f))
    seen = []
    store = patching._store

    def observing_store(address, size, value):
        seen.append((size, _maps_at(address), sorted(_rwx())))
        store(address, size, value)

    rwx_before = sorted(_rwx())
    patching._store = observing_store
    try:
        index.retarget("g", G2v.entry)
        site = index.sites("g")[0].site
        old = patching.patch_rel32(site, G1v.entry)
    finally:
        patching._store = store
    return {"seen": seen, "rwx_before": rwx_before, "rwx_after": sorted(_rwx()),
            "site_function": site.function,
            "old_was_g2": old == G2v.entry, "page_after": _maps_at(Fv.entry),
            "mixed": Fv.call(2) - _f_expected(2, 0)}


def test_code_pages_are_rw_while_written_and_rx_after():
    out = run_child(scenario_write_is_never_rwx)
    assert out["seen"]
    for size, perms, rwx in out["seen"]:
        assert perms == "rw-p", (size, perms)        # writable, never executable
        assert rwx == out["rwx_before"]              # no RWX mapping appeared
    assert out["rwx_after"] == out["rwx_before"]
    assert out["page_after"] == "r-xp"
    assert out["old_was_g2"]
    # The entry's g call site reaches v1 again, the resume entry's still v2;
    # f(2) runs the entry's site on both levels: g v1 twice.
    assert out["site_function"] == "osrjit.fn.f"
    assert out["mixed"] == 2 * 1


def scenario_patch_from_inside_a_live_frame():
    """h(n) = hook(n) + g(n): the hook retargets g while h's frame (and code
    page) is live on this very stack; the call after the hook runs g v2."""
    from direct_loader import DirectLoader
    state = {}

    def hook(x):
        state["index"].retarget("g", state["g2"])
        return x

    loader = DirectLoader(hook=hook)
    [g1], [g2], [h] = _direct(G1), _direct(G2), _direct(HOOKED, g=1)
    loader.load_version(g1)
    H = loader.load_version(h)
    state["g2"] = loader.load_version(g2).entry
    index = state["index"] = patching.CallSiteIndex()
    index.add("h", H.obj, H.load_addresses, patching.callee_symbols(h))
    out = {"value": H.call(5), "page": _maps_at(H.entry)}
    loader.close()
    return out


def test_patching_from_a_hook_while_the_caller_frame_is_live():
    out = run_child(scenario_patch_from_inside_a_live_frame)
    assert out["value"] == 5 + (5 + 100)
    assert out["page"] == "r-xp"


def test_index_bookkeeping_and_duplicate_keys():
    index = patching.CallSiteIndex()
    assert index.sites("g") == () and index.callees() == set()
    with pytest.raises(KeyError):
        index.remove("nope")
    [f] = _direct(F, g=1)
    assert patching.callee_symbols(f) == {"g": "osrjit.fn.g", "f": "osrjit.fn.f"}
    # Not loaded anywhere: no sites, so no live memory is touched.
    index.add("f", _emit(f), {}, patching.callee_symbols(f))
    assert index.sites("g") == () and "f" in index and index.keys() == ["f"]
    with pytest.raises(KeyError, match="already"):
        index.add("f", _emit(f), {}, ["g"])
    assert index.plan_retarget("g", 0x1234) == []


def test_call_site_geometry():
    s = patching.CallSite("osrjit.fn.g", 0x1000 + 59, 0x1000 + 60)
    assert s.return_address == 0x1000 + 64 and not s.straddles_cache_line
    t = patching.CallSite("osrjit.fn.g", 0x1000 + 60, 0x1000 + 61)
    assert t.straddles_cache_line
    assert s.displacement_to(s.return_address + 10) == 10
    assert patching.fits_rel32(2 ** 31 - 1) and not patching.fits_rel32(2 ** 31)
    assert re.search(r"call osrjit\.fn\.g at 0x103b", repr(s))


# --------------------------------------------------------------------------
# replace(): direct calls in old code patched after the release when no
# thread runs old code, in the pause otherwise
# --------------------------------------------------------------------------

REC = """
def rec(n, k):
    if n == 0:
        return spin(k) + hook(0)
    return rec(n - 1, k) + {step}
"""
SPIN_LOOP = """
def spin(k):
    x = hook(-1)
    i = 0
    while i < k:
        x = (x * 1103515245 + 12345) % 2147483648
        i = i + 1
    return hook(x)
"""


def deferred_patch_scenario(walker, poll_free):
    """A thread 200 frames deep in rec; rec is replaced twice. Every direct
    call to rec, in every loaded version, must lead to the current version
    once replace() returns — whether the patches were written in the pause
    (a thread runs old code outside a site: the poll-free spin of an old
    version is interrupted by the signal) or after the release."""
    import threading
    import time

    import osrjit
    from osrjit.native import patching
    out = {"ok": [], "quiet": []}
    with osrjit.Runtime(calls="direct", walker=walker, transfer="native") as rt:
        rt.compile(SPIN_LOOP, polls=not poll_free)
        rt.compile(REC.format(step=1))
        in_spin = threading.Event()

        def on_hook(x):
            if x == -1:
                in_spin.set()
                return 1
            return 0
        rt.on_hook(on_hook)
        if not poll_free:
            # Polls are reached however loaded the machine: never stopped by the signal.
            rt.native_backend.world.grace = 5.0
        rec = rt.function("rec")
        threading.stack_size(16 << 20)
        # With polls the spin runs until a version that ends it; poll-free
        # it cannot be replaced while it runs, so it ends by itself (seconds).
        k = 400_000_000 if poll_free else 1 << 40
        t = threading.Thread(target=lambda: out.setdefault("result", rec(200, k)))
        t.start()
        assert in_spin.wait(60)
        # ... and back from the hook, in the loop (IN_JIT).
        import ctypes
        from osrjit.native import threads as th
        state = next(st for ident, st, _ in rt.native_backend.registry.snapshot() if ident == t.ident)
        deadline = time.monotonic() + 60
        while (rt.native_backend.world.support.load_status(ctypes.addressof(state)) != th.IN_JIT
               and time.monotonic() < deadline):
            time.sleep(0.001)
        for step in (2, 3):
            if poll_free:
                # The old spin runs outside any site: its version stays executing.
                rt.replace("spin", SPIN_LOOP.replace("i = i + 1", "i = i + 1 + 0"),
                           polls=False)
            rt.replace("rec", REC.format(step=step))
            out["quiet"].append(rt.last_pause.quiet)
            current = rt.current("rec").entry
            targets = [patching.resolve(s.site).final_target for s in rt.native_backend.call_sites.sites("rec")]
            out["ok"].append(bool(targets) and all(x == current for x in targets))
        # End the spin: a version whose loop exits at once (again until the
        # thread is done: a spinner stopped by the signal moves at a later stop).
        deadline = time.monotonic() + 60
        while t.is_alive() and time.monotonic() < deadline:
            rt.replace("spin", SPIN_LOOP.replace("i = i + 1", "i = k"), polls=not poll_free)
            t.join(timeout=0.5)
        t.join(timeout=120)
        out["alive"] = t.is_alive()
        out["stats"] = rt.stats()
    return out


@pytest.mark.parametrize("walker", ["python", "native"])
@pytest.mark.parametrize("poll_free", [False, True])
def test_direct_calls_reach_the_current_version_after_replace(walker, poll_free):
    out = run_child(deferred_patch_scenario, walker, poll_free, timeout=300)
    assert out["ok"] == [True, True]
    assert not out["alive"] and out["result"] == 200 * 3
    # quiet: patched after the release; not quiet (old spin executing): in the pause.
    assert out["quiet"] == ([False, False] if poll_free else [True, True])
    assert out["stats"]["pending_returns"] == 0
