"""Pictures for the README: a filmstrip of a generated MP4, and the drift curves of a quality run.

The benchmark lives in the package (``ff_engine/bench/filmstrip.py``, also ``ff-engine bench filmstrip``); this script
only calls it, so a checkout and an installed package run the same code.
"""

from ff_engine.bench.filmstrip import main

if __name__ == "__main__":
    raise SystemExit(main())
