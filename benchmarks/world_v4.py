"""World-model checkpoints measured side by side on held-out scroll worlds (``ff-engine bench world_v4``)."""

from ff_engine.bench.world_v4 import main

if __name__ == "__main__":
    main()  # returns its result (not an exit code)
