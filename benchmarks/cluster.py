"""The same mixed workload on a RayCluster of 1 and of N workers, in one run.

The benchmark lives in the package (``ff_engine/bench/cluster.py``, also ``ff-engine bench cluster``); this script
only calls it, so a checkout and an installed package run the same code.
"""

from ff_engine.bench.cluster import main

if __name__ == "__main__":
    main()  # returns its result (not an exit code)
