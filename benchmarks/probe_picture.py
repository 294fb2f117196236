"""The memory probe as pictures: what the model makes of a returning subject under each policy's cache.

The benchmark lives in the package (``ff_engine/bench/probe_picture.py``, also ``ff-engine bench probe_picture``); this script
only calls it, so a checkout and an installed package run the same code.
"""

from ff_engine.bench.probe_picture import main

if __name__ == "__main__":
    main()  # returns its result (not an exit code)
