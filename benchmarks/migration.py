"""Live migration cost between two workers (``ff_engine/bench/migration.py``; also ``ff-engine bench migration``)."""

from ff_engine.bench.migration import main

if __name__ == "__main__":
    main()
