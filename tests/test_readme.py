"""The README's Python examples run as written."""

import pathlib
import re

import pytest
from helpers import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
    code = BLOCKS[index]
    if "import torch" in code and torch is None:
        pytest.skip("needs torch==2.13.0 (CPU wheel for Python 3.11 only)")
    import jax

    # README examples are user code: they run under JAX's default promotion rules.
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        exec(compile(code, f"README.md block {index}", "exec"), {"__name__": "__readme__"})
