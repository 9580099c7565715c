"""taquba benchmarks: key ordering, sweeps, throughput, peers and memory.

Run everything with ``make bench`` (``python -m benchmarks.run --profile full``)
or the quick target check with ``make bench-check``.  Results are appended to
``benchmarks/RESULTS.md``.
"""
