"""The README's main job, ``python -m noxton``, runs and reports agreement."""

import subprocess
import sys


def test_tour_runs_and_agrees():
    result = subprocess.run([sys.executable, "-m", "noxton"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "All differences within 1e-05" in out
    for front in (
        "| MultiheadAttention | Equinox |",
        "| MultiheadAttention | Haiku |",
        "| SqueezeExcitation | Equinox |",
        "| SqueezeExcitation | Haiku |",
    ):
        assert front in out
    assert "(10, 64) | (10, 10)" in out and "(64, 28, 28)" in out
