"""Throughput of many concurrent streams, bounded caches against unbounded ones, side by side in one run.

The benchmark lives in the package (``ff_engine/bench/throughput.py``, also ``ff-engine bench throughput``); this script
only calls it, so a checkout and an installed package run the same code.
"""

from ff_engine.bench.throughput import main

if __name__ == "__main__":
    main()  # returns its result (not an exit code)
