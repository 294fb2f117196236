"""The benchmarks, as modules of the installed package: ``ff-engine bench NAME`` imports ``ff_engine.bench.NAME``
and calls its ``main(argv)``; ``benchmarks/NAME.py`` in a checkout is a three-line script calling the same.

Results are written under ``benchmarks/results`` of the source checkout this package runs from (an editable
install), else under ``./benchmarks/results`` of the working folder.
"""

from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[2]
REPO = _CHECKOUT if (_CHECKOUT / "benchmarks").is_dir() else Path.cwd()
RESULTS_DIR = REPO / "benchmarks" / "results"

#: ``ff-engine bench`` names -> modules of this package (``kernels`` is the kernel benchmark's short name)
BENCHMARKS = {name: name for name in (
    "attention", "cluster", "combine_probes", "device_check", "filmstrip", "load", "migration", "page_candidates",
    "merge_analysis", "policy_overhead", "probe_picture", "quality", "return_grid", "scroll_quality", "simulate", "simulate_check",
    "throughput",
    "world_diagnostics",
    "world_v4")} | {"kernels": "kernel_bench"}
