"""Long-horizon quality of every cache policy on the in-repo world model, against the unbounded cache.

The benchmark lives in the package (``ff_engine/bench/quality.py``, also ``ff-engine bench quality``); this script
only calls it, so a checkout and an installed package run the same code.
"""

from ff_engine.bench.quality import main

if __name__ == "__main__":
    main()  # returns its result (not an exit code)
