"""The README's demo command runs and checks its own result (exit status 0)."""
import subprocess
import sys

from childproc import ROOT_DIR


def test_demo_runs_from_the_quickstart_command():
    p = subprocess.run([sys.executable, "-m", "osrjit", "demo"], cwd=ROOT_DIR,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "HIJACKED" in p.stdout
    assert "'pending_returns': 0" in p.stdout and "'freed_versions': 1" in p.stdout
    assert "'freed_versions': 2" in p.stdout
    assert "agrees from the first JIT frame to its last frame: True" in p.stdout
    assert "replace(walk): stopped 3 threads" in p.stdout
    for d in (200, 400, 600):
        assert f"walk({d}) = {10 * d} " in p.stdout
