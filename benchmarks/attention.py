"""Paged vs contiguous attention at Wan-like shapes, vLLM's CPU op vs the torch SDPA reference.

The benchmark lives in the package (``ff_engine/bench/attention.py``, also ``ff-engine bench attention``); this script
only calls it, so a checkout and an installed package run the same code.
"""

from ff_engine.bench.attention import main

if __name__ == "__main__":
    main()  # returns its result (not an exit code)
