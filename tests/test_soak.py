"""The soak (scripts/soak.py) for one minute: threads, replaces, collects, close,
fork, interrupts and overflows at random, every result checked.

Longer runs: ``python scripts/soak.py --seconds 1800 --seed S`` (README, *Longer runs*).
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_soak(tmp_path, seconds, seed, *extra):
    out = tmp_path / "soak.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "soak.py"),
                           "--seconds", str(seconds), "--seed", str(seed), "--json", str(out),
                           *extra],
                          capture_output=True, text=True, timeout=seconds + 600)
    assert out.exists(), f"no report; exit {proc.returncode}\n{proc.stderr[-4000:]}"
    report = json.loads(out.read_text())
    assert proc.returncode == 0 and not report["failures"], (
        f"exit {proc.returncode}; failures:\n" + "\n".join(report["failures"])
        + f"\nstderr:\n{proc.stderr[-4000:]}")
    return report


def test_soak_one_minute(tmp_path):
    report = run_soak(tmp_path, 60, 20261203)
    counts = report["counts"]
    # The mix did run: results were checked and replacements transferred frames.
    assert counts["calls_checked"] > 0
    assert counts.get("stats_transfers", 0) > 0
    print(json.dumps(report["counts"]))


@pytest.mark.slow
def test_soak_ten_minutes_on_the_reference_paths(tmp_path):
    run_soak(tmp_path, 600, 7, "--paths", "reference")
