"""The README's Python examples run as written."""

import pathlib
import re

import pytest

from conftest import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
# A block right after this comment is not run yet (an API that is still being built).
NOT_YET = "<!-- tests/test_readme.py: not run until the porting API lands (issue 11) -->"
BLOCKS = re.findall(r"(" + re.escape(NOT_YET) + r"\n)?```python\n(.*?)```", README.read_text(), flags=re.S)


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_block_runs(index):
    not_yet, code = BLOCKS[index]
    if not_yet:
        pytest.skip("the porting API of issue 11 has not landed yet")
    if "import torch" in code and torch is None:
        pytest.skip("needs torch==2.13.0 (CPU wheel for Python 3.11 only)")
    import jax

    # README examples are user code: they run under JAX's default promotion rules.
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        exec(compile(code, f"README.md block {index}", "exec"), {"__name__": "__readme__"})
