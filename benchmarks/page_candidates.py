"""How well do page summaries stand in for scoring every token?  Candidate recall and regret of Future Forcing.

The benchmark lives in the package (``ff_engine/bench/page_candidates.py``, also ``ff-engine bench page_candidates``); this script
only calls it, so a checkout and an installed package run the same code.
"""

from ff_engine.bench.page_candidates import main

if __name__ == "__main__":
    raise SystemExit(main())
