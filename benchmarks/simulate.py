"""Cluster simulation (``ff_engine/bench/simulate.py``; also ``ff-engine bench simulate``)."""

from ff_engine.bench.simulate import main

if __name__ == "__main__":
    main()
