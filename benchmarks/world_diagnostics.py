"""Why a world-model checkpoint does or does not hold its world: three measurements on *training* seeds only.

The benchmark lives in the package (``ff_engine/bench/world_diagnostics.py``, also ``ff-engine bench world_diagnostics``); this script
only calls it, so a checkout and an installed package run the same code.
"""

from ff_engine.bench.world_diagnostics import main

if __name__ == "__main__":
    raise SystemExit(main())
