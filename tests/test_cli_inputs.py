"""Every wrong CLI input is one line on stderr and exit code 2, refused before any heavy work (no model built, no
engine, no analysis), and leaves no file or folder behind; sizes are checked against memory and the model's
limits before anything is allocated; output appears under its final name only when complete.

Most cases run in-process through ``ff_engine.cli.main``; Ctrl-C runs the real entry point in a subprocess (so
does ``test_cli.py``'s one-line check, which also covers vLLM's import-time notice)."""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ff_engine import analysis, memory
from ff_engine import cli as cli_mod
from ff_engine.cli import main
from ff_engine.engine import Engine
from ff_engine.errors import BudgetError
from model_adapters.causal_wan import PRESETS, CausalWanModel

TINY = ["--model", "wan-tiny", "--random-weights"]


class Reached(Exception):
    """Raised where heavy work would start: a bad input must never get there."""


def _heavy(*a, **k):
    raise Reached


@pytest.fixture
def guarded(monkeypatch, tmp_path):
    """Run in an empty working folder with model building, engines and the analysis replaced by ``Reached``."""
    monkeypatch.setattr(cli_mod, "build_model", _heavy)
    monkeypatch.setattr(Engine, "__init__", _heavy)
    monkeypatch.setattr(analysis, "analyze_queries", _heavy)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def run(argv, capsys) -> tuple[int, list[str]]:
    try:
        rc = main(argv)
    except SystemExit as exc:  # argparse inside a benchmark script exits
        rc = exc.code
    return rc, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def assert_one_line_exit_2(argv, needle, capsys, work: Path):
    rc, lines = run(argv, capsys)
    assert rc == 2 and len(lines) == 1, lines
    assert needle in lines[0] and "Traceback" not in lines[0], lines
    assert list(work.iterdir()) == [], f"left behind: {list(work.iterdir())}"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """Broken and unusual input files, made once."""
    d = tmp_path_factory.mktemp("inputs")
    sd = {k: v.contiguous() for k, v in CausalWanModel(PRESETS["wan-tiny"]).state_dict().items()}
    for name, config in (("bad_json", "{not json"), ("bad_field", '{"num_heads": 0}'), ("bad_type", "[1, 2]")):
        (d / name).mkdir()
        save_file(sd, str(d / name / "model.safetensors"))
        (d / name / "config.json").write_text(config)
    save_file(sd, str(d / "bad_meta.safetensors"), metadata={"ff_engine_config": "{oops"})
    torch.save({"generator": sd, "args": argparse.Namespace(lr=1e-4)}, d / "pickled.pt")
    torch.save([1, 2, 3], d / "list.pt")
    torch.save({"a": 1}, d / "dict.pt")
    (d / "empty.pt").write_bytes(b"")
    torch.save(torch.full((4, 256), float("nan")), d / "nan.pt")
    (d / "vae").mkdir()
    (d / "vae" / "config.json").write_text("garbage")
    (d / "a_file").write_text("x")
    return {p.name: p for p in d.iterdir()} | {"dir": d}


def _read_only_dir(tmp_path) -> Path:
    """A folder this process cannot create files in: chmod for ordinary users, sysfs for root (which chmod does
    not stop)."""
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        return ro
    try:
        os.close(os.open("/sys/ff_engine_probe.mp4", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except OSError:
        return Path("/sys")
    pytest.skip("no read-only folder available")


# ---- item 4: inputs that ended in a traceback ----------------------------------------------------------------
BAD_ARGS = [
    (["generate", "--page-size", "0"], "--page-size"),
    (["plan", "--page-size", "0"], "--page-size"),
    (["plan", "--page-size", "-1"], "--page-size"),
    (["analyze", "queries", "--page-size", "0"], "--page-size"),
    (["bench", "attention", "--page-size", "0"], "--page-size"),
    (["bench", "attention", "--repeats", "0"], "--repeats"),
    (["generate", "--seconds", "1e308"], "int32 token positions"),
    (["plan", "--seconds", "1e308"], "seconds"),
    (["generate", "--seed", str(10**23)], "--seed"),
    (["generate", "--seed", "-1"], "--seed"),
    (["generate", "--num-pages", "0"], "--num-pages"),
    (["generate", "--preset", "bogus"], "--preset"),
    (["generate", "--policy", "h2o", "--policy-arg", "num_queries=-1"], "num_queries"),
    (["generate", "--policy", "snapkv", "--policy-arg", "kernel=0"], "kernel"),
    (["generate", "--policy", "future-forcing", "--policy-arg", "merge_key_tol=nan"], "merge_key_tol"),
    (["generate", "--policy", "future-forcing", "--policy-arg", "candidate_oversample=nan"], "candidate_oversample"),
    (["generate", "--policy", "future-forcing", "--ff-horizon", "1000"], "horizon"),
    (["plan", "--seconds", "1", "--budget-frames", "30"], "saves nothing"),
    (["analyze", "queries", "--frames", "3"], "2 blocks"),
]


@pytest.mark.parametrize("argv,needle", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_bad_flags_are_one_line_exit_2_before_any_work(argv, needle, guarded, capsys):
    out = ["--out", "new/sub/v.mp4"] if argv[0] == "generate" else []
    out = ["--out-dir", "new/sub"] if argv[0] == "analyze" else out
    out = ["--out", "new/sub/r.json"] if argv[0] == "bench" else out
    assert_one_line_exit_2([*argv, *out], needle, capsys, guarded)


BAD_FILES = [
    (
        "checkpoint_preset",
        lambda f: ["--model", str(f["bad_json"] / "model.safetensors"), "--preset", "bogus"],
        "--preset",
    ),
    (
        "config_json",
        lambda f: ["--model", str(f["bad_json"] / "model.safetensors"), "--preset", "wan-tiny"],
        "not valid JSON",
    ),
    (
        "config_field",
        lambda f: ["--model", str(f["bad_field"] / "model.safetensors"), "--preset", "wan-tiny"],
        "num_heads",
    ),
    (
        "config_type",
        lambda f: ["--model", str(f["bad_type"] / "model.safetensors"), "--preset", "wan-tiny"],
        "JSON object",
    ),
    ("safetensors_metadata", lambda f: ["--model", str(f["bad_meta.safetensors"]), "--preset", "wan-tiny"], "metadata"),
    ("prompt_list", lambda f: [*TINY, "--prompt-embeds", str(f["list.pt"])], "got a list"),
    ("prompt_dict", lambda f: [*TINY, "--prompt-embeds", str(f["dict.pt"])], "without tensors"),
    ("prompt_empty", lambda f: [*TINY, "--prompt-embeds", str(f["empty.pt"])], "empty file"),
    ("prompt_nan", lambda f: [*TINY, "--prompt-embeds", str(f["nan.pt"])], "NaN"),
    ("prompt_checkpoint", lambda f: [*TINY, "--prompt-embeds", str(f["pickled.pt"])], "--prompt-embeds"),
    ("vae_garbage", lambda f: [*TINY, "--vae", str(f["vae"])], "--vae"),
    ("out_is_folder", lambda f: [*TINY, "--out", str(f["dir"])], "folder"),
    ("out_is_device", lambda f: [*TINY, "--out", "/dev/full"], "not a regular file"),
    ("out_under_a_file", lambda f: [*TINY, "--out", str(f["a_file"] / "v.mp4")], "is a file"),
    ("out_suffix", lambda f: [*TINY, "--out", "v.avi"], ".mp4"),
]


@pytest.mark.parametrize("name,argv,needle", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_files_are_one_line_exit_2_before_any_work(name, argv, needle, files, guarded, capsys):
    args = argv(files)
    out = [] if "--out" in args else ["--out", "new/v.mp4"]
    assert_one_line_exit_2(["generate", *args, *out], needle, capsys, guarded)


def test_pickled_checkpoint_is_refused_with_the_reason(files, guarded, capsys):
    """Item 7: not torch's hint to set weights_only=False, but why ff-engine refuses."""
    rc, lines = run(["generate", "--model", str(files["pickled.pt"]), "--preset", "wan-tiny"], capsys)
    assert rc == 2 and len(lines) == 1
    assert "refuses to unpickle" in lines[0] and "argparse.Namespace" in lines[0]
    assert "weights_only" not in lines[0]


def test_unwritable_outputs_fail_before_compute(tmp_path, files, guarded, capsys):
    ro = _read_only_dir(tmp_path)
    assert_one_line_exit_2(["generate", *TINY, "--out", str(ro / "v.mp4")], "--out", capsys, guarded)
    assert_one_line_exit_2(["generate", *TINY, "--out", str(ro / "new" / "v.mp4")], "--out", capsys, guarded)
    for out_dir in (ro / "analysis", files["a_file"] / "analysis"):
        assert_one_line_exit_2(["analyze", "queries", *TINY, "--out-dir", str(out_dir)], "--out-dir", capsys, guarded)


def test_plan_takes_every_memory_form_its_message_lists(capsys):
    from ff_engine.plan import parse_bytes

    assert [parse_bytes(t) for t in ("8e9", "80GiB", "141GB", "1.5 TiB", "2E3kb")] == [
        8 * 10**9,
        80 * 2**30,
        141 * 10**9,
        int(1.5 * 2**40),
        2 * 10**6,
    ]
    assert main(["plan", "--gpu-mem", "8e9", "--json"]) == 0
    assert '"kv_bytes_available"' in capsys.readouterr().out


# ---- item 3: sizes are bounded before allocation -------------------------------------------------------------
SIZES = [
    (["--num-pages", "100000000"], "at most --num-pages"),
    (["--budget-frames", "99999999999"], "int32 token positions"),
    (["--policy", "unbounded", "--frames", "99999999"], "at most --frames"),
    (["--page-size", "16777216"], "at most --page-size"),
    ([*TINY, "--page-size", "16", "--num-pages", "3"], "reservation"),
]


@pytest.mark.parametrize("argv,needle", SIZES, ids=[" ".join(a) for a, _ in SIZES])
def test_oversized_requests_are_refused_before_allocation(argv, needle, guarded, capsys):
    assert_one_line_exit_2(["generate", *argv, "--out", "v.mp4"], needle, capsys, guarded)


def test_long_videos_are_bounded_by_memory_not_a_rope_table(guarded, capsys, monkeypatch):
    """400 s (1,600 latent frames, past the 1,024-frame RoPE table): unbounded it needs its whole length in pages
    and is refused saying how many frames fit; bounded it passes every check and reaches the model build."""
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 64 * 2**30)
    wan = ["generate", "--model", "wan-1.3b", "--random-weights", "--seconds", "400", "--out", "v.mp4"]
    rc, lines = run([*wan, "--policy", "unbounded"], capsys)
    assert rc == 2 and len(lines) == 1 and "usable" in lines[0], lines
    assert 0 < int(re.search(r"at most --frames (\d+) fits", lines[0]).group(1)) < 1600
    with pytest.raises(Reached):
        main([*wan, "--policy", "window", "--budget-frames", "6"])


@pytest.mark.parametrize(
    "flag,base",
    [
        ("--budget-frames", ["--budget-frames", "600", "--frames", "900"]),
        ("--frames", ["--policy", "unbounded", "--frames", "900"]),
        ("--num-pages", ["--num-pages", "10000000"]),
    ],
)
def test_the_size_the_error_names_fits_and_one_more_does_not(flag, base, guarded, capsys, monkeypatch):
    """With 64 MiB available, the largest value the message offers passes the memory check (the run reaches the
    model build) and that value + 1 is refused."""
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 64 * 2**20)
    rc, lines = run(["generate", *TINY, *base, "--out", "v.mp4"], capsys)
    assert rc == 2 and len(lines) == 1
    best = int(re.search(rf"at most {flag} (\d+) fits", lines[0]).group(1))
    argv = ["generate", *TINY, *base, "--out", "v.mp4"]
    fits = argv.copy()
    fits[fits.index(flag) + 1] = str(best)
    with pytest.raises(Reached):
        main(fits)
    capsys.readouterr()
    step = 3 if flag == "--frames" else 1  # frames count in whole blocks
    over = argv.copy()
    over[over.index(flag) + 1] = str(best + step)
    rc, lines = run(over, capsys)
    assert rc == 2 and "usable" in lines[0]


def test_cache_page_bytes_matches_the_cache_tensors_and_pool_bookkeeping():
    from ff_engine.cache import PagedKVCache
    from ff_engine.cache.page_pool import PagePool

    def tensor_bytes(num_pages):
        c = PagedKVCache(2, 3, 16, 8, num_pages)
        return sum(t.numel() * t.element_size() for o in (c, c.storage, c.summaries) for t in vars(o).values()
                   if isinstance(t, torch.Tensor))

    per_page = (tensor_bytes(60) - tensor_bytes(10)) / 50
    assert per_page == memory.cache_page_bytes(8, 3, 16, torch.float32) - memory.PAGE_BOOKKEEPING_BYTES
    PagePool(1)  # vLLM imported before measuring
    tracemalloc.start()
    pool = PagePool(20000)
    used, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert pool.capacity == 20000 and used / 20000 <= memory.PAGE_BOOKKEEPING_BYTES


def test_the_cache_refuses_a_pool_that_does_not_fit_before_allocating(monkeypatch):
    from ff_engine.cache import PagedKVCache

    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 100 * 2**20)
    per_page = memory.cache_page_bytes(32, 2, 128, torch.float32)
    with pytest.raises(BudgetError, match=r"num_pages 100000000 .* at most (\d+) pages") as err:
        PagedKVCache(2, 2, 128, 32, 100_000_000)
    fit = int(re.search(r"at most (\d+) pages", str(err.value)).group(1))
    assert fit == int(100 * 2**20 * 0.9) // per_page - 1
    PagedKVCache(2, 2, 128, 32, fit)  # exactly what the message offers is accepted


# ---- item 5: no half-written output --------------------------------------------------------------------------
def test_a_failure_mid_run_leaves_no_video_and_no_folder(tmp_path, capsys, monkeypatch):
    from ff_engine.engine.engine import BlockResult

    real_step, calls = Engine.step, []

    def failing_step(self, ids=None):
        calls.append(1)
        if len(calls) == 2:
            return [BlockResult(ids[0], 1, None, True, "non-finite latents (NaN/inf); session cancelled")]
        return real_step(self, ids)

    monkeypatch.setattr(Engine, "step", failing_step)
    out = tmp_path / "new" / "v.mp4"
    rc, lines = run(["generate", *TINY, "--frames", "12", "--page-size", "16", "--out", str(out), "--quiet"], capsys)
    assert rc == 1 and len(lines) == 1 and "block 1" in lines[0]
    assert len(calls) == 2 and not (tmp_path / "new").exists()  # the first block was written, then discarded


def test_a_complete_run_leaves_only_the_video(tmp_path, capsys):
    out = tmp_path / "v.mp4"
    rc, _ = run(["generate", *TINY, "--frames", "6", "--page-size", "16", "--out", str(out), "--quiet"], capsys)
    assert rc == 0 and [p.name for p in tmp_path.iterdir()] == ["v.mp4"] and out.stat().st_size > 0


def test_analysis_output_is_both_files_or_neither(tmp_path, monkeypatch):
    result = {
        "blocks": 2,
        "layers": {0: {k: {"relative_drift": [0, 1], "cosine": [1, 1]} for k in ("pre_rope", "post_rope")}},
        "summary": {},
    }
    analysis.write(result, tmp_path / "a")
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["query_drift.json", "query_drift.png"]

    def broken_plot(*a, **k):
        raise OSError("No space left on device")

    monkeypatch.setattr(analysis, "plot_drift", broken_plot)
    with pytest.raises(OSError):
        analysis.write(result, tmp_path / "b")
    assert list((tmp_path / "b").iterdir()) == []


# ---- end to end: the console entry point ---------------------------------------------------------------------
def _cli(*args, **kw):
    return subprocess.Popen(
        [sys.executable, "-m", "ff_engine.cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


def test_ctrl_c_is_one_line_exit_130_and_leaves_no_partial_video(tmp_path):
    out = tmp_path / "new" / "v.mp4"
    p = _cli("generate", *TINY, "--frames", "600", "--page-size", "16", "--out", str(out), "--quiet")
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob("new/.v.*.partial.mp4")) and p.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert p.poll() is None, p.communicate()[1]
    time.sleep(3)  # into the block loop: frames are being encoded into the temporary file
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert p.returncode == 130 and lines == ["ff-engine: interrupted"], err
    assert not (tmp_path / "new").exists()
