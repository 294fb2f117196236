"""Kernel benchmarks for the GPU path (``ff-engine bench kernels``), side by side in one run.

The benchmark lives in the package (``ff_engine/bench/kernel_bench.py``, also ``ff-engine bench kernels``); this script
only calls it, so a checkout and an installed package run the same code.
"""

from ff_engine.bench.kernel_bench import main

if __name__ == "__main__":
    main()  # returns its result (not an exit code)
