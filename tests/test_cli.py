import subprocess
import sys
from pathlib import Path

import av
import pytest

from ff_engine.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ff_engine.cli", *args], capture_output=True, text=True, timeout=300,
                          check=False)


def test_generate_writes_a_real_mp4(tmp_path, capsys):
    out = tmp_path / "v.mp4"
    rc = main(["generate", "--model", "wan-tiny", "--random-weights", "--policy", "sink-window", "--sink-frames", "3",
               "--budget-frames", "6", "--frames", "12", "--page-size", "16", "--out", str(out), "--quiet"])
    assert rc == 0 and out.is_file()
    with av.open(str(out)) as c:
        frames = sum(1 for _ in c.decode(video=0))
        w, h = c.streams.video[0].width, c.streams.video[0].height
    assert frames == 1 + 4 * 11 and (w, h) == (12 * 8, 8 * 8)
    assert "wrote" in capsys.readouterr().out


def test_seconds_to_latent_frames():
    from model_adapters.causal_wan import PRESETS

    g = PRESETS["wan-1.3b"].geometry()
    assert g.latent_frames(5.0) == 21  # 81 video frames = 21 latent, Self-Forcing's default
    assert g.latent_frames(60.0) == 240


@pytest.mark.parametrize("args,needle", [
    (["--model", "missing.safetensors"], "--model"),
    (["--seconds", "0"], "--seconds"),
    (["--seconds", "-3"], "--seconds"),
    (["--random-weights", "--policy", "sink-window", "--sink-frames", "3", "--budget-frames", "2"], "budget_frames 2"),
    (["--random-weights", "--policy", "lru"], "unknown policy"),
    (["--model", "wan-1.3b", "--random-weights", "--policy", "unbounded", "--seconds", "400"], "usable"),  # memory
    (["--random-weights", "--page-size", "24", "--backend", "vllm-cpu"], "page_size 24"),
    (["--random-weights", "--prompt-embeds", "nope.pt"], "--prompt-embeds"),
    (["--model", "wan-tiny"], "--random-weights"),
])
def test_bad_cli_input_is_one_line_exit_2(args, needle):
    r = run_cli("generate", *args, "--out", "/tmp/ff_should_not_exist.mp4", "--quiet")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()  # exactly one: no vLLM import notice ("Triton is installed...") either
    assert len(lines) == 1 and needle in lines[0], r.stderr
    assert not Path("/tmp/ff_should_not_exist.mp4").exists() and not list(Path("/tmp").glob(".ff_should_not_exist.*"))


def test_future_forcing_from_the_cli(tmp_path):
    out = tmp_path / "ff.mp4"
    rc = main(["generate", "--model", "wan-tiny", "--random-weights", "--policy", "future-forcing", "--ff-horizon", "3",
               "--ff-merge", "affine", "--policy-arg", "value_norm=false", "--budget-frames", "6", "--frames", "12",
               "--page-size", "16", "--out", str(out), "--quiet"])
    assert rc == 0 and out.is_file()


@pytest.mark.parametrize("args,needle", [
    (["--policy", "future-forcing", "--ff-horizon", "-1"], "horizon"),
    (["--policy", "future-forcing", "--policy-arg", "bogus=1"], "bogus"),
    (["--policy", "future-forcing", "--policy-arg", "decay=abc"], "decay"),
    (["--policy", "window", "--ff-horizon", "3"], "no parameter"),
])
def test_bad_policy_flags_are_one_line_errors(args, needle):
    r = run_cli("generate", "--random-weights", *args, "--out", "/tmp/ff_should_not_exist.mp4", "--quiet")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and needle in lines[0], r.stderr


def test_plan_command(capsys):
    assert main(["plan", "--preset", "wan-1.3b", "--gpu-mem", "80GiB", "--budget-frames", "21", "--seconds", "60"]) == 0
    out = capsys.readouterr().out
    assert "streams per GPU" in out and "unbounded 1, bounded 10" in out


def test_generate_and_analyze_keep_their_own_defaults():
    from ff_engine.cli import make_parser

    gen, ana = make_parser().parse_args(["generate"]), make_parser().parse_args(["analyze", "queries"])
    assert (gen.seconds, gen.page_size) == (5.0, 32) and (ana.seconds, ana.page_size) == (10.0, 16)
