"""Simulation vs a real two-replica run (``ff_engine/bench/simulate_check.py``; also ``ff-engine bench simulate_check``)."""

from ff_engine.bench.simulate_check import main

if __name__ == "__main__":
    main()
