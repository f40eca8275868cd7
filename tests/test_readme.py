"""The Python examples of the README and of the docs pages that have no notebook run as written."""

import pathlib
import re

import pytest
from helpers import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
PAGES = ("README.md", "docs/changing_models.md", "docs/decoding.md")
BLOCKS = [
    (page, i, code)
    for page in PAGES
    for i, code in enumerate(re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), flags=re.S))
]


@pytest.mark.parametrize(("page", "index", "code"), BLOCKS, ids=[f"{p}-{i}" for p, i, _ in BLOCKS])
def test_example_runs(page, index, code):
    if "import torch" in code and torch is None:
        pytest.skip("needs torch==2.13.0 (CPU wheel for Python 3.11 only)")
    if "import quax" in code:
        pytest.importorskip("quax", reason="quax (Python 3.11+, JAX 0.7.2+) is installed with torch's env only")
    import jax

    # The examples are user code: they run under JAX's default promotion rules.
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        exec(compile(code, f"{page} block {index}", "exec"), {"__name__": "__example__"})
