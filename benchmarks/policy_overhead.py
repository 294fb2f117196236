"""Policy overhead (statistics + scoring + merge + compaction) as a share of block time, in the engine.

The benchmark lives in the package (``ff_engine/bench/policy_overhead.py``, also ``ff-engine bench policy_overhead``); this script
only calls it, so a checkout and an installed package run the same code.
"""

from ff_engine.bench.policy_overhead import main

if __name__ == "__main__":
    main()  # returns its result (not an exit code)
