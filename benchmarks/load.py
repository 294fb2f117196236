"""Load test of ``ff-engine serve`` over loopback: concurrent REST and WebSocket streams with cancels, malformed

The benchmark lives in the package (``ff_engine/bench/load.py``, also ``ff-engine bench load``); this script
only calls it, so a checkout and an installed package run the same code.
"""

from ff_engine.bench.load import main

if __name__ == "__main__":
    raise SystemExit(main())
