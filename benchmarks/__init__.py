"""noxton's benchmark, run from the repository root: ``python -m benchmarks --help``.

``contenders`` builds each library's attention call, ``measure`` times them (in one process, or one
process per long-sequence run), ``report`` writes the tables, the plot and ``docs/performance.md``.
``reference`` holds the torch squeeze-excitation block that the tests share. Beside it: ``tiles`` (the
blockwise path's tile and chunk sizes), ``decoding`` (decoding with a key/value cache) and ``products`` (matrix
products alone, XLA against torch, with the cores each keeps busy).
"""

# Every contender, in this process and in each long-sequence child (``python -m benchmarks --child``),
# runs under the glibc malloc thresholds that ``import noxton`` sets (docs/differences.md), as it would
# in a user's process that imports noxton: the comparison is between the libraries, not allocator states.
import os as _os

# On a GPU, JAX would otherwise take 75% of its memory at its first call, leaving torch (timed in the
# same process) the rest; so JAX allocates as it goes, and both report their own peaks.
_os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import noxton as _noxton  # noqa: E402, F401
