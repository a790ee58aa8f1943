"""The package as a user gets it: a wheel built by ``pip wheel .``, installed
into a fresh virtual environment, run from a directory that holds no source.

The wheel is built with the running environment's setuptools (``.[test]``
installs one that can: ``setuptools>=77``) and without build isolation, so no
download is needed; an older setuptools falls back to pip's isolated build,
which downloads one. The fresh environment gets the wheel alone
(``--no-deps --no-index``) and sees the running environment's llvmlite,
pyelftools and unicorn through a ``.pth`` file — not its ``osrjit``: paths
named in a ``.pth`` file are not site directories, so the editable install's
finder there is never run, and the environment's own site-packages comes
first.
"""
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from childproc import ROOT_DIR

PACKAGES = ("osrjit", "unwinder", "deopt")
#: Files of the checkout that are not the package's sources (never copied to the build).
NOT_SOURCES = (".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache",
               ".hypothesis", "tests", "scripts", ".ci")


def _run(cmd, cwd, timeout=300, env=None):
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert p.returncode == 0, f"{' '.join(map(str, cmd))} -> {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p.stdout


def _clean_env():
    """The environment of a user's shell: nothing puts the checkout on the path."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _setuptools_builds_here() -> bool:
    """Whether this environment's setuptools builds the wheel without isolation
    (PEP 639 licence metadata needs 77; 70.1 and later have ``bdist_wheel``)."""
    try:
        major = int(importlib.metadata.version("setuptools").split(".")[0])
    except importlib.metadata.PackageNotFoundError:
        return False
    return major >= 77


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> str:
    """Path of the wheel ``pip wheel`` builds from a copy of the checkout."""
    base = tmp_path_factory.mktemp("wheel")
    src = base / "src"
    shutil.copytree(ROOT_DIR, src, ignore=shutil.ignore_patterns(*NOT_SOURCES))
    dist = base / "dist"
    cmd = [sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-w", str(dist)]
    if _setuptools_builds_here():
        cmd += ["--no-build-isolation", "--no-index"]
    _run(cmd, cwd=base, env=_clean_env())
    (found,) = dist.glob("osrjit-*.whl")
    return str(found)


@pytest.fixture(scope="module")
def venv_python(wheel, tmp_path_factory) -> str:
    """A fresh venv's interpreter with the wheel installed (and nothing of the checkout)."""
    venv = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=venv)
    python = str(venv / "bin" / "python")
    purelib = _run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   cwd=venv).strip()
    import elftools
    import llvmlite
    import unicorn
    deps = dict.fromkeys(os.path.dirname(os.path.dirname(os.path.abspath(m.__file__)))
                         for m in (llvmlite, elftools, unicorn))
    with open(os.path.join(purelib, "osrjit_test_dependencies.pth"), "w") as fh:
        fh.write("".join(d + "\n" for d in deps))
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
          wheel], cwd=venv, env=_clean_env())
    return python


@pytest.fixture
def elsewhere(tmp_path) -> str:
    """A working directory with no source in it."""
    return str(tmp_path)


def test_the_wheel_ships_every_package_its_native_sources_licence_and_metadata(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        meta = z.read(metadata).decode()
    for package in PACKAGES:
        for dirpath, dirnames, filenames in os.walk(os.path.join(ROOT_DIR, package)):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            for f in filenames:
                if f.endswith((".py", ".ll", ".s")) or f == "py.typed":
                    rel = os.path.relpath(os.path.join(dirpath, f), ROOT_DIR)
                    assert rel.replace(os.sep, "/") in names, f"{rel} is not in the wheel"
        assert f"{package}/py.typed" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    import osrjit
    assert f"\nVersion: {osrjit.__version__}\n" in meta
    assert "\nLicense-Expression: MIT\n" in meta
    assert "\nLicense-File: LICENSE\n" in meta
    for classifier in ("Operating System :: POSIX :: Linux",
                       "Programming Language :: Python :: 3.11", "Typing :: Typed"):
        assert f"\nClassifier: {classifier}\n" in meta
    assert "\nPlatform: Linux x86-64\n" in meta
    assert not any(n.startswith(("tests/", "scripts/")) for n in names)


def test_the_installed_package_is_the_wheel_with_its_version_and_plugin(venv_python, elsewhere):
    out = _run([venv_python, "-c", """if True:
        import importlib.metadata as md, json, os, osrjit, unwinder, deopt
        eps = [e.value for e in md.entry_points(group="pytest11") if e.name == "osrjit"]
        print(json.dumps({"files": [m.__file__ for m in (osrjit, unwinder, deopt)],
                          "version": osrjit.__version__, "metadata": md.version("osrjit"),
                          "typed": [os.path.exists(os.path.join(os.path.dirname(m.__file__),
                                                                "py.typed"))
                                    for m in (osrjit, unwinder, deopt)],
                          "plugin": eps}))
        """], cwd=elsewhere, env=_clean_env())
    facts = json.loads(out)
    venv = os.path.dirname(os.path.dirname(venv_python))
    for path in facts["files"]:
        assert path.startswith(venv + os.sep), f"{path} is not the installed wheel's"
    import osrjit
    assert facts["version"] == facts["metadata"] == osrjit.__version__
    assert facts["typed"] == [True, True, True]
    assert facts["plugin"] == ["osrjit.testing.plugin"]
    assert _run([venv_python, "-m", "osrjit", "--version"], cwd=elsewhere,
                env=_clean_env()).strip() == f"osrjit {osrjit.__version__}"
    assert _run([venv_python, "-m", "osrjit", "bench", "--help"], cwd=elsewhere,
                env=_clean_env()).startswith("usage: python -m osrjit bench")


def test_the_installed_wheel_runs_the_demo_from_another_directory(venv_python, elsewhere):
    out = _run([venv_python, "-m", "osrjit", "demo"], cwd=elsewhere, env=_clean_env())
    assert "HIJACKED" in out
    assert "'pending_returns': 0" in out and "'freed_versions': 1" in out
    assert "agrees from the first JIT frame to its last frame: True" in out


def _bench(venv_python, cwd, *options):
    out = os.path.join(cwd, "out.json")
    _run([venv_python, "-m", "osrjit", "bench", *options, "--json", "out.json"], cwd=cwd,
         env=_clean_env(), timeout=1800)
    with open(out) as fh:
        figures = json.load(fh)
    assert figures["errors"] == {}
    for key in ("walk_ns_per_frame", "deopt_ns_per_frame", "steady_state_ratio",
                "stw_pause_ratio_vs_glibc", "rss_growth_bytes_10k_cycles"):
        assert figures[key] is not None, key
    return figures


def test_the_installed_wheel_runs_every_benchmark_part_from_another_directory(venv_python,
                                                                              elsewhere):
    figures = _bench(venv_python, elsewhere, "--smoke")
    assert figures["smoke"] is True
    assert figures["walk_ns_per_frame"]["native"]["100"] > 0


@pytest.mark.slow
def test_the_installed_wheel_runs_the_quick_benchmarks(venv_python, elsewhere):
    figures = _bench(venv_python, elsewhere, "--quick")
    assert figures["quick"] is True
    assert set(figures["stw_pause_ratio_vs_glibc"]) == {"1", "2", "4"}
