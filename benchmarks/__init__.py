"""noxton's benchmark, run from the repository root: ``python -m benchmarks --help``.

``contenders`` builds each library's attention call, ``measure`` times them (in one process, or one
process per long-sequence run), ``report`` writes the tables, the plot and ``docs/performance.md``.
``reference`` holds the torch squeeze-excitation block that the tests share.
"""
