"""Merge memory-probe results of several ``quality.py --probe-only`` runs on the same seeds (e.g. the policies

The benchmark lives in the package (``ff_engine/bench/combine_probes.py``, also ``ff-engine bench combine_probes``); this script
only calls it, so a checkout and an installed package run the same code.
"""

from ff_engine.bench.combine_probes import main

if __name__ == "__main__":
    raise SystemExit(main())
