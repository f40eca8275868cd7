"""More than one device: data parallel and head-sharded tensor parallel on 8 CPU devices.

``--xla_force_host_platform_device_count`` only works when set before JAX
starts, and this process has JAX running already, so the checks run in a
subprocess (``tests/sharding_check.py``) with the flag in its environment. The
subprocess executes the code of docs/multiple_devices.md verbatim, then more
configurations, and reports the largest difference from the single-device
result for each, and how the arrays were laid out.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-6


def run_check():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.path.join(HERE, os.pardir), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, os.path.join(HERE, "sharding_check.py")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, f"sharding_check.py failed:\n{proc.stdout}\n{proc.stderr}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("SHARDING_REPORT ")]
    assert lines, f"no report in:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(lines[-1][len("SHARDING_REPORT ") :])


COMPARED = [
    "readme_data_parallel",
    "readme_tensor_parallel",
    "separate_tensor_parallel_out",
    "separate_tensor_parallel_weights",
    "data_and_heads_out",
    "data_and_heads_weights",
    "haiku_data_and_heads_out",
    "haiku_data_and_heads_weights",
    "squeeze_excitation_data_parallel",
]


def test_sharded_runs_match_single_device():
    # One test, so that the subprocess runs once even when xdist splits the module.
    report = run_check()
    assert report["devices"] == 8
    assert report["readme_blocks"] >= 1
    errors = {name: report["errors"][name] for name in COMPARED}
    bad = {name: e for name, e in errors.items() if not e <= TOL}
    assert not bad, f"differences from the single-device result above {TOL}: {bad}"

    c = report["checks"]
    # data parallel: the output batch of 16 is split 2 per device over 8 devices
    assert c["out_dp_devices"] == 8 and c["out_dp_shard_shapes"] == [[2, 10, 64]]
    # tensor parallel: in_proj_weight (192, 64) in 8 row blocks of whole heads (3 x head_dim = 24 rows),
    # out_proj.weight (64, 64) in 8 column blocks of one head each, q_proj_weight one head per device
    assert c["in_proj_weight_devices"] == 8 and c["in_proj_weight_shards"] == [[24, 64]]
    assert c["out_proj_weight_shards"] == [[64, 8]]
    assert c["q_proj_weight_shards"] == [[8, 64]]
    assert c["data_and_heads_out_devices"] == 8
    assert c["se_out_devices"] == 8
