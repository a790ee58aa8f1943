"""The native hijack (deopt.native_hijack), the self-scan handshake (osrjit.native.selfscan),
the lazy hijack batches and the LIFO
entries built from them — on synthetic walks whose answer is known."""
import ctypes
import struct
from array import array

import pytest

from childproc import run_child
from deopt import native_transfer as ntx
from deopt.hijack import HijackBatch, HijackError, HijackTable

STUB = 0x5700
SITE_STUB = 0x5810
TRANSLATED = 2          # unwinder.native.FRAME_TRANSLATED


def _walk(stack, pcs, translated=(), no_slot=()):
    """Raw OutFrame bytes of a walk whose frame i has pc ``pcs[i]`` and whose
    return address (frame i + 1's pc) sits in ``stack[i]``."""
    base = ctypes.addressof(stack)
    raw = b""
    for i, pc in enumerate(pcs):
        slot = 0 if i in no_slot or i + 1 == len(pcs) else base + 8 * i
        raw += struct.pack("<4Q", pc, 0x1000 + i, slot, TRANSLATED if i in translated else 0)
        if slot and i + 1 < len(pcs):
            stack[i] = STUB if i + 1 in translated else pcs[i + 1]
    return raw


def plan_scenario():
    """Plan, check, write and build LIFO entries on a synthetic stack."""
    import osrjit
    from osrjit.native.fastscan import ThreadHijacks

    class V:
        def __init__(self, name, lo, hi, ras):
            self.name, self.code_range = name, (lo, hi)
            self.frame_maps = [type("FM", (), {"return_address": ra})() for ra in ras]

    new = V("f", 0x2000, 0x2100, [0x2010, 0x2020])       # being replaced
    old = V("g", 0x3000, 0x3100, [0x3010])               # an old version
    from osrjit.native.fastscan import WatchTables
    # Each key's slots get its own stub (per-site stubs): 0x2020's is SITE_STUB.
    tables = WatchTables([new, old], {"f"}, lambda v: v is old,
                         lambda ra: SITE_STUB if ra == 0x2020 else STUB)
    out = {"keys": tables.keys, "hijack": tables.hijack}
    with osrjit.Runtime() as rt:
        hj = rt.native_backend.scanner.native()
        stack = (ctypes.c_uint64 * 16)()
        pcs = [0x2050,            # 0: innermost, interrupted in f (first=1 skips it)
               0x2010,            # 1: f at a site: hijack
               0x2020,            # 2: f at a site, already hijacked
               0x3010,            # 3: old g at a site, not translated: executing
               0x3060,            # 4: old g outside any site: executing (range)
               0x2010,            # 5: f at a site whose slot is unknown: not hijackable
               0x2020,            # 6: f at a site: hijack
               0x9999]            # 7: elsewhere
        raw = _walk(stack, pcs, translated={2}, no_slot={4})
        h = ThreadHijacks(hj, raw, len(pcs), 1, tables, 77)
        out["m"], out["t"] = h.m, h.t
        out["counts"], out["range_counts"] = h.counts, h.range_counts
        out["frames"] = [(f.version.name, f.slot is None, f.pc) for f in h.frames()]
        out["executing"] = sorted(v.name for v in h.executing())
        out["versions"] = sorted(v.name for v in h.versions())
        slots = list(h.slots[:h.m])
        base = ctypes.addressof(stack)
        out["slots"] = [(s - base) // 8 for s in slots]
        stubs = tables.stub_array
        out["stubs"] = list(stubs)
        out["check"] = hj.apply(h.slots, h.ras, h.kinds, h.m, stubs, 0)
        # Change one slot behind the plan's back: the check names it, nothing is written.
        stack[5] = 0x1234
        out["check_bad"] = hj.apply(h.slots, h.ras, h.kinds, h.m, stubs, 0)
        stack[5] = 0x2020
        before = list(stack)
        out["write"] = hj.apply(h.slots, h.ras, h.kinds, h.m, stubs, 1)
        out["written"] = [i for i in range(16) if stack[i] != before[i]]
        out["stub_in"] = [i for i in range(16) if stack[i] == STUB]
        out["site_stub_in"] = [i for i in range(16) if stack[i] == SITE_STUB]
        # Descending order is a check failure too.
        rev = (ctypes.c_uint64 * 2)(h.slots[1], h.slots[0])
        ras = (ctypes.c_uint64 * 2)(SITE_STUB, STUB)           # what the slots hold
        out["not_rising"] = hj.apply(rev, ras, h.kinds, 2, stubs, 0)
        # LIFO entries: highest slot first; kinds without a descriptor are left out.
        descs = array("Q", [0] * len(tables.keys))
        descs[tables.keys.index(0x2010)] = 0xD1
        descs[tables.keys.index(0x2020)] = 0xD2
        buf = ctypes.create_string_buffer(32 * h.m)
        n = hj.lifo(buf, h.slots, h.ras, h.kinds, h.m, descs.buffer_info()[0])
        words = memoryview(buf.raw).cast("Q")
        out["lifo"] = [((words[4 * i] - base) // 8, words[4 * i + 1], words[4 * i + 2],
                        words[4 * i + 3]) for i in range(n)]
        descs[tables.keys.index(0x2020)] = 0
        out["lifo_partial"] = hj.lifo(buf, h.slots, h.ras, h.kinds, h.m, descs.buffer_info()[0])
    return out


def test_native_plan_check_write_and_lifo_on_a_synthetic_stack():
    out = run_child(plan_scenario)
    assert out["keys"] == [0x2010, 0x2020, 0x3010] and out["hijack"] == [1, 1, 0]
    assert out["m"] == 2 and out["t"] == 1
    # per key [hijack, not hijackable, already hijacked]
    assert out["counts"] == [1, 1, 0, 1, 0, 1, 0, 1, 0]
    assert out["range_counts"] == [0, 1]                  # f's range: none; g's: frame 4
    assert out["frames"] == [("f", False, 0x2010), ("f", False, 0x2020), ("f", True, 0x2020)]
    assert out["executing"] == ["f", "g"]                 # frame 5 (f), frames 3-4 (g)
    assert out["versions"] == ["f"]
    assert out["slots"] == [0, 5]                         # the slots holding frames 1 and 6
    assert out["check"] == 0 and out["check_bad"] == 2    # entry 1 (+1) is the bad one
    assert out["stubs"] == [STUB, SITE_STUB, STUB]
    assert out["write"] == 0 and out["written"] == [0, 5]
    assert out["stub_in"] == [0, 1]                       # slot 1 held the stub already
    assert out["site_stub_in"] == [5]                     # frame 6, at 0x2020
    assert out["not_rising"] == 2
    assert out["lifo"] == [(5, 0x2020, 0xD2, ntx.PENDING), (0, 0x2010, 0xD1, ntx.PENDING)]
    assert out["lifo_partial"] == 1


# --------------------------------------------------------------------------
# Lazy batches in the hijack table (pure Python)
# --------------------------------------------------------------------------

class _Mirror:
    def __init__(self):
        self.map = {}

    def set(self, slot, ra):
        self.map[slot] = ra

    def update(self, slots, ras):
        self.map.update(zip(slots, ras))

    def discard(self, slot):
        self.map.pop(slot, None)


class _Memory:
    def __init__(self, words):
        self.words = words

    def read_u64(self, a):
        return self.words[a]

    def write_u64(self, a, v):
        self.words[a] = v


def _batch(slots, ras, kinds, meta, thread=1, **kw):
    return HijackBatch(array("Q", slots), array("Q", ras), array("Q", kinds), meta, thread, **kw)


def test_batches_answer_like_records_and_make_them_only_on_demand():
    table = HijackTable(STUB)
    table.mirror = _Mirror()
    a, b = object(), object()
    meta = [("fmA", a), ("fmB", b)]
    table.add_batch(_batch([0x10, 0x20, 0x30], [0xA1, 0xB2, 0xA3], [0, 1, 0], meta))
    assert len(table) == 3 and table.hijacks == 3
    assert table.pending_for(a) == 2 and table.pending_for(b) == 1
    assert table.translate(0x20, STUB) == 0xB2 and table.translate(0x28, STUB) == STUB
    assert table.translate(0x20, 0x77) == 0x77
    r = table.get(0x30)
    assert (r.slot, r.original_ra, r.frame_map, r.owner, r.thread) == (0x30, 0xA3, "fmA", a, 1)
    assert table.mirror.map == {}                         # not yet flushed
    rec = table.take(0x10)                                # a Python transfer
    assert rec.original_ra == 0xA1 and rec.owner is a
    table.flush_mirror()                                  # only what is still pending
    assert table.mirror.map == {0x20: 0xB2, 0x30: 0xA3}
    with pytest.raises(HijackError):
        table.take(0x10)                                  # exactly once
    with pytest.raises(HijackError):
        table.hijack(0x20, 0xB2, "fm", b, _Memory({0x20: 0xB2}))   # never twice
    assert table.take_many([0x30, 0x20]) == {a: 1, b: 1}
    assert len(table) == 0 and table.taken == 3 and table.records() == []
    assert table.mirror.map == {}
    with pytest.raises(HijackError):
        table.take_many([0x20])


def test_batch_counts_by_owner_from_given_kind_counts():
    a = object()
    b = _batch([1, 2], [3, 4], [0, 0], [("fm", a)], kind_counts={0: 2})
    assert b.by_owner == {a: 2}
    with pytest.raises(HijackError):
        _batch([1, 2], [3], [0, 0], [("fm", a)])


# --------------------------------------------------------------------------
# LIFO entries pushed as bytes (pure Python: no dispatcher runs)
# --------------------------------------------------------------------------

def _entries(*triples):
    return b"".join(struct.pack("<4Q", s, r, d, ntx.PENDING) for s, r, d in triples)


def test_lifo_commit_keeps_one_descending_order_across_pushes():
    lifo = ntx.ThreadLifo()
    lifo.push_entries(_entries((0x90, 1, 7), (0x80, 2, 7)))
    lifo.commit()
    assert [e[0] for e in lifo.entries()] == [0x90, 0x80] and lifo.block.top == 2
    # Below the pending ones: appended as they are (the fast path).
    lifo.push_entries(_entries((0x70, 3, 7), (0x60, 4, 7)))
    lifo.commit()
    assert [e[0] for e in lifo.entries()] == [0x90, 0x80, 0x70, 0x60]
    # Interleaved with them, plus a single push: sorted.
    lifo.push_entries(_entries((0x88, 5, 7), (0x50, 6, 7)))
    lifo.push(type("R", (), {"slot": 0x75, "original_ra": 8})(), 9)
    lifo.commit()
    assert [e[0] for e in lifo.entries()] == [0x90, 0x88, 0x80, 0x75, 0x70, 0x60, 0x50]
    assert lifo.block.top == 7 and len(lifo) == 7
    # A status the dispatcher moved is reported by slot, once.
    ctypes.c_int64.from_address(lifo.block.entries + 32 * 6 + 24).value = ntx.TAKEN
    ctypes.c_int64.from_address(lifo.block.entries + 32 * 1 + 24).value = ntx.HANDED
    assert lifo.drain() == ([0x50], [0x88])
    assert lifo.drain() == ([], [])
    lifo.commit()                       # nothing queued: the array stays as it is
    assert lifo.size == 7
    lifo.push_entries(_entries((0x40, 1, 7)))
    lifo.commit()                       # compacted: the moved entries are gone
    assert [e[0] for e in lifo.entries()] == [0x90, 0x80, 0x75, 0x70, 0x60, 0x40]
    with pytest.raises(ntx.NativeTransferError):
        lifo.push_entries(b"\0" * 31)


def _filler(*triples):
    """``fill(address) -> written`` writing these LIFO entries there."""
    data = _entries(*triples)

    def fill(address):
        ctypes.memmove(address, data, len(data))
        return len(triples)
    return fill


def test_lifo_append_writes_on_top_in_place_or_declines():
    lifo = ntx.ThreadLifo()
    # Empty: written at the bottom, no commit needed.
    assert lifo.append(_filler((0x90, 1, 7), (0x80, 2, 7)), 2, 0x90) == 2
    assert [e[0] for e in lifo.entries()] == [0x90, 0x80] and lifo.block.top == 2
    # Deeper frames go on top, in place.
    address = lifo.block.entries
    assert lifo.append(_filler((0x70, 3, 7)), 1, 0x70) == 1
    assert [e[0] for e in lifo.entries()] == [0x90, 0x80, 0x70] and lifo.block.top == 3
    assert lifo.block.entries == address
    # Not deeper than every pending entry: declined, nothing changes.
    assert lifo.append(_filler((0x75, 4, 7)), 1, 0x75) is None
    assert [e[0] for e in lifo.entries()] == [0x90, 0x80, 0x70]
    # A moved entry not yet drained stays (drain reports it later), the new
    # entries go above it; once every entry is drained, the next starts afresh.
    ctypes.c_int64.from_address(lifo.block.entries + 32 * 2 + 24).value = ntx.TAKEN
    assert lifo.append(_filler((0x60, 5, 7)), 1, 0x60) == 1
    assert lifo.size == 4 and lifo.drain() == ([0x70], [])
    for i in range(4):
        ctypes.c_int64.from_address(lifo.block.entries + 32 * i + 24).value = ntx.TAKEN
    assert sorted(lifo.drain()[0]) == [0x60, 0x80, 0x90]
    many = [(0x1000 - 8 * i, i, 7) for i in range(40)]          # beyond the capacity of 16
    assert lifo.append(_filler(*many), 40, 0x1000) == 40
    assert lifo.size == 40 and lifo.block.capacity >= 40
    assert [e[0] for e in lifo.entries()] == [t[0] for t in many]
    # Queued pushes: declined (a commit merges them).
    lifo.push_entries(_entries((0x10, 1, 7)))
    assert lifo.append(_filler((0x8, 2, 7)), 1, 0x8) is None


def test_lifo_commit_without_drain_never_rewrites_undrained_entries():
    lifo = ntx.ThreadLifo()
    lifo.push_entries(_entries((0x90, 1, 7), (0x80, 2, 7)))
    lifo.commit()
    ctypes.c_int64.from_address(lifo.block.entries + 24).value = ntx.TAKEN
    # Nothing queued: the statuses are not read, the array is left as it is.
    assert lifo.commit(drain=False) == ([], [])
    assert lifo.size == 2
    # Something queued: the array is rewritten, so it is drained first — the
    # moved entry is reported and not written back as PENDING.
    lifo.push_entries(_entries((0x70, 3, 7)))
    assert lifo.commit(drain=False) == ([0x90], [])
    assert [e[0] for e in lifo.entries()] == [0x80, 0x70]


def cancel_scenario():
    """osrjit_hj_cancel from every handshake state; from SCANNING it waits."""
    import threading
    import time

    import osrjit
    from osrjit.native import selfscan as ss
    with osrjit.Runtime(walker="native") as rt:
        hj = rt.native_backend.scanner.native()
        # The same code called without the GIL, so a Python thread can end the "scan".
        cancel = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(ctypes.cast(hj.cancel, ctypes.c_void_p).value)
        hs = ss.Handshake()
        states = []
        for start in (ss.HS_IDLE, ss.HS_REQUESTED, ss.HS_SCANNED):
            hs.state = start
            cancel(ctypes.addressof(hs))
            states.append(hs.state)
        hs.state = ss.HS_SCANNING

        def finish():
            time.sleep(0.05)
            hs.state = ss.HS_SCANNED
        t = threading.Thread(target=finish)
        t.start()
        t0 = time.monotonic()
        cancel(ctypes.addressof(hs))
        waited = time.monotonic() - t0
        t.join()
        states.append(hs.state)
    return states, waited


def test_cancel_withdraws_a_request_and_waits_for_a_running_scan():
    from osrjit.native.selfscan import HS_IDLE
    states, waited = run_child(cancel_scenario)
    assert states == [HS_IDLE] * 4
    assert waited >= 0.04               # it returned only once the scan was over


def park_scan_scenario():
    """osrjit_hj_park_scan takes a request only while STOP is set."""
    import osrjit
    from osrjit.native import selfscan as ss
    with osrjit.Runtime(walker="native") as rt:
        rt.native_backend.scanner.native()
        address = rt.native_backend.support.service("osrjit_park_scan")
        park_scan = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p)(address)
        anchor = (ctypes.c_uint64 * 17)()       # RSP 0: no JIT frame, nothing walked
        flag = ctypes.c_int64(0)
        hs = ss.Handshake()
        hs.args.anchor = ctypes.addressof(anchor)
        out = []
        for stop in (0, 1):
            flag.value = stop
            hs.state, hs.status = ss.HS_REQUESTED, -1
            park_scan(ctypes.addressof(hs), ctypes.addressof(flag))
            out.append((hs.state, hs.status))
        hs.state = ss.HS_IDLE                   # not requested: nothing happens
        park_scan(ctypes.addressof(hs), ctypes.addressof(flag))
        out.append((hs.state, hs.status))
    return out


def test_park_scan_takes_a_request_only_while_the_world_is_stopping():
    from deopt.native_hijack import SCAN_NO_ANCHOR
    from osrjit.native import selfscan as ss
    late, current, idle = run_child(park_scan_scenario)
    # STOP clear: a thread late from a stop that is over gives the request back.
    assert late == (ss.HS_REQUESTED, -1)
    assert current == (ss.HS_SCANNED, SCAN_NO_ANCHOR)
    assert idle == (ss.HS_IDLE, SCAN_NO_ANCHOR)
