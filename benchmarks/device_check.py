"""The GPU check in one command, for a CUDA machine with nothing installed beyond PyTorch + Triton.

The benchmark lives in the package (``ff_engine/bench/device_check.py``, also ``ff-engine bench device_check``); this script
only calls it, so a checkout and an installed package run the same code.
"""

from ff_engine.bench.device_check import main

if __name__ == "__main__":
    raise SystemExit(main())
