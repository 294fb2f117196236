"""Free rollouts on world model v4's scroll world, every cache policy against the truth.

The benchmark lives in the package (``ff_engine/bench/scroll_quality.py``, also ``ff-engine bench scroll_quality``);
this script only calls it, so a checkout and an installed package run the same code.
"""

from ff_engine.bench.scroll_quality import main

if __name__ == "__main__":
    raise SystemExit(main())
