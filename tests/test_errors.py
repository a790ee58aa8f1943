"""One error root: everything osrjit.Runtime raises is an osrjit.OsrJitError."""
import inspect

import pytest

import deopt
import osrjit
import unwinder
from childproc import run_child
from osrjit import errors
from osrjit.testing.scenarios import SUM_V1

V1 = """
def f(n):
    hook(n)
    return n
"""
NEEDS_MORE = """
def f(n):
    x = n * 2
    hook(n)
    return x + n
"""


def test_every_public_error_is_exported_and_rooted():
    defined = {name for name, obj in vars(errors).items()
               if inspect.isclass(obj) and issubclass(obj, BaseException)
               and obj.__module__ == errors.__name__}
    assert defined <= set(osrjit.__all__)
    for name in defined:
        assert issubclass(getattr(osrjit, name), osrjit.OsrJitError), name


def test_deopt_and_unwinder_errors_are_wrapped_with_their_cause():
    original = deopt.IncompatibleVersion("site 3 differs", site_id=3, reason="types")
    twin = errors.wrap_error(original)
    assert isinstance(twin, osrjit.IncompatibleVersion)
    assert isinstance(twin, deopt.IncompatibleVersion) and isinstance(twin, osrjit.OsrJitError)
    assert (twin.site_id, twin.reason, str(twin)) == (3, "types", "site 3 differs")
    bad = unwinder.CFIError("bad CIE", offset=0x10)
    twin = errors.wrap_error(bad)
    assert isinstance(twin, osrjit.UnwindFailure) and isinstance(twin, unwinder.CFIError) is False
    assert isinstance(twin, unwinder.UnwindError) and twin.offset == 0x10
    plain = ValueError("x")
    assert errors.wrap_error(plain) is plain


def incompatible_native_scenario(transfer, walker):
    out = {}
    with osrjit.Runtime(transfer=transfer, walker=walker) as rt:
        rt.compile(V1)

        def on_hook(_):
            try:
                rt.replace("f", NEEDS_MORE)
            except osrjit.OsrJitError as e:
                out["caught"] = (type(e).__name__, isinstance(e, deopt.IncompatibleVersion),
                                 type(e.__cause__).__module__, e.site_id is not None)
            return 0
        rt.on_hook(on_hook)
        out["result"] = rt.function("f")(7)
        out["versions"] = len(rt.versions("f"))
        for bad in (lambda: rt.replace("nope", V1), lambda: rt.compile("def f(:\n"),
                    lambda: rt.function("nope")):
            try:
                bad()
            except osrjit.OsrJitError as e:
                out.setdefault("others", []).append(type(e).__name__)
    try:
        rt.compile(V1)
    except osrjit.OsrJitError as e:
        out["closed"] = type(e).__name__
    return out


@pytest.mark.parametrize("paths", [("fast", "fast"), ("reference", "reference")])
def test_an_incompatible_replace_is_an_osrjit_error(paths):
    out = run_child(incompatible_native_scenario, *paths)
    assert out["caught"] == ("IncompatibleVersion", True, "deopt.errors", True)
    assert out["result"] == 7 and out["versions"] == 1       # the old version kept running
    assert out["others"] == ["UnknownFunction", "CompileError", "UnknownFunction"]
    assert out["closed"] == "RuntimeClosed"


def test_emulated_incompatible_replace_is_an_osrjit_error():
    rt = osrjit.Runtime(backend="emulated")
    assert isinstance(rt, osrjit.Runtime)
    rt.compile(SUM_V1)
    t = rt.spawn("sum", 30)
    rt.run(300)
    with pytest.raises(osrjit.OsrJitError) as err:
        rt.replace("sum", SUM_V1.replace("return n + sum(n - 1)",
                                         "m = n * 2\n    r = sum(n - 1)\n    return r + m - n"))
    assert isinstance(err.value, deopt.IncompatibleVersion)
    rt.run()
    assert t.result == sum(range(31))
