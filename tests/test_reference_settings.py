"""Self-Forcing / LongLive settings (local_attn_size, sink_size, num_frame_per_block, context_noise) map exactly onto
budget and sink: the paged engine equals a port of the reference rolling cache for every combination the reference
accepts, down to a window holding only the sink and the current block."""

import pytest
import torch
from dense_reference import dense_generate
from test_engine import noises, tiny_model

from ff_engine.engine import Engine, SessionConfig
from ff_engine.errors import ConfigError
from ff_engine.policies import FutureForcing, Window
from ff_engine.policies.reference import ReferenceSettings

COMBOS = [  # local_attn_size, sink_size (3-frame blocks)
    (6, 3),   # only the sink and the current block: the old budget rule refused it
    (7, 3),   # one recent frame besides the sink
    (9, 3),   # LongLive-like: sink + two blocks
    (4, 0),   # one frame besides the block
]


@pytest.mark.parametrize("local,sink", COMBOS)
def test_engine_equals_reference_rolling_cache(local, sink):
    m = tiny_model()
    prompt = torch.randn(5, m.cfg.text_dim)
    frames = 12
    init, steps = noises(m, frames, seed=7)
    ref = dense_generate(m, prompt, frames, local, sink, init, steps)
    settings = ReferenceSettings(local_attn_size=local, sink_size=sink, num_frame_per_block=3)
    settings.check_model(m.geometry)
    e = Engine(m, num_pages=200, page_size=5, backend="torch", context_noise=settings.context_noise)
    out = e.generate(SessionConfig(prompt=prompt, num_frames=frames, initial_noise=init, step_noise=steps,
                                   **settings.session_kwargs()))
    assert (out - ref).abs().max() <= 1e-4


def test_mapping_table():
    s = ReferenceSettings(local_attn_size=12, sink_size=3, num_frame_per_block=3)  # LongLive's setting
    assert (s.budget_frames, s.sink_frames, s.policy().name) == (9, 3, "sink-window")
    assert ReferenceSettings(local_attn_size=21).session_kwargs()["budget_frames"] == 18
    assert ReferenceSettings().budget_frames is None and ReferenceSettings().policy().name == "unbounded"
    ff = s.policy(FutureForcing())
    assert ff.name == "future-forcing" and ff.sink_frames == 3
    ff.validate(s.budget_frames, 3)


@pytest.mark.parametrize("kwargs,needle", [
    ({"local_attn_size": 5, "sink_size": 3}, "local_attn_size"),  # the reference's roll would go negative
    ({"local_attn_size": 2}, "local_attn_size"),
    ({"local_attn_size": 0}, "local_attn_size"),
    ({"sink_size": -1}, "sink_size"),
    ({"num_frame_per_block": 0}, "num_frame_per_block"),
    ({"context_noise": float("nan")}, "context_noise"),
    ({"context_noise": 2000}, "context_noise"),
])
def test_what_the_reference_refuses_is_one_line(kwargs, needle):
    with pytest.raises(ConfigError, match=needle) as ei:
        ReferenceSettings(**kwargs)
    assert "\n" not in str(ei.value)


def test_wrong_block_size_and_policy_mismatches_are_errors():
    m = tiny_model()
    with pytest.raises(ConfigError, match="num_frame_per_block 4"):
        ReferenceSettings(local_attn_size=8, num_frame_per_block=4).check_model(m.geometry)
    with pytest.raises(ConfigError, match="global"):
        ReferenceSettings().policy(Window())
    m2 = tiny_model(frames_per_block=4)  # the override a user loads the model with
    ReferenceSettings(local_attn_size=8, num_frame_per_block=4).check_model(m2.geometry)


@pytest.mark.parametrize("flags,policy,budget,sink", [
    (["--local-attn-size", "6", "--sink-size", "3"], "sink-window", 3, 3),
    (["--local-attn-size", "12", "--sink-size", "3", "--policy", "future-forcing"], "future-forcing", 9, 3),
    (["--local-attn-size", "8", "--num-frame-per-block", "4"], "window", 4, 0),
])
def test_cli_flags_map_onto_budget_and_sink(flags, policy, budget, sink):
    from ff_engine import cli
    from ff_engine.policies import make_policy

    args = cli.make_parser().parse_args(["generate", "--model", "wan-tiny", "--random-weights", "--frames", "24",
                                         "--backend", "torch", *flags])
    cli.reference_flags(args)
    pol = make_policy(args.policy, **cli.policy_args(args))
    prep = cli.prepare(args, pol)
    assert (pol.name, prep.budget_frames, pol.sink_frames) == (policy, budget, sink)
    assert prep.geometry.frames_per_block == (args.num_frame_per_block or 3)


def test_cli_refuses_what_the_reference_refuses(capsys):
    from ff_engine import cli

    assert cli.main(["generate", "--model", "wan-tiny", "--random-weights", "--local-attn-size", "5",
                     "--sink-size", "3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "local_attn_size" in err[0]
