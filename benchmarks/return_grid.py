"""What each cache policy shows when content comes back (``ff_engine/bench/return_grid.py``)."""

from ff_engine.bench.return_grid import main

if __name__ == "__main__":
    raise SystemExit(main())
