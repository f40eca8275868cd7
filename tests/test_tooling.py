"""The test tooling's own assumptions about JAX, checked against the installed JAX."""

import configparser
import json
import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A compilation cache entry left empty, as a worker that has opened it for writing leaves it for a moment.
_TRUNCATED_ENTRY = """
import glob, json, os, warnings
import jax, jax.numpy as jnp

f = jax.jit(lambda x: jnp.sin(x) * 2.0)
x = jnp.arange(4.0)
want = f(x).tolist()
entries = glob.glob(os.path.join(os.environ["JAX_COMPILATION_CACHE_DIR"], "*-cache"))
for entry in entries:
    open(entry, "wb").close()
jax.clear_caches()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    got = f(x).tolist()
print(json.dumps({"entries": len(entries), "want": want, "got": got, "warnings": [str(w.message) for w in caught]}))
"""


def _ignored_messages():
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["tool:pytest"]["filterwarnings"].split("\n")
    return [line.split(":")[1] for line in lines if line.startswith("ignore:") and line.split(":")[1]]


def test_a_truncated_compilation_cache_entry_is_compiled_again_with_the_warning_setup_cfg_ignores(tmp_path):
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        JAX_COMPILATION_CACHE_DIR=str(tmp_path),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    done = subprocess.run(
        [sys.executable, "-c", _TRUNCATED_ENTRY], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["entries"] > 0
    assert seen["got"] == seen["want"]
    read_errors = [m for m in seen["warnings"] if "compilation cache" in m]
    assert read_errors, seen["warnings"]
    for message in read_errors:
        assert any(re.match(pattern, message, re.I) for pattern in _ignored_messages()), message
