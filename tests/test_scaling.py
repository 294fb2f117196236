"""The pages-based scaling rule (``ff_engine.serving.scaling.decide``) that the Serve autoscaling policy applies."""

from ff_engine.serving.scaling import decide

KW = {"pages_per_replica": 100, "lo": 1, "hi": 4}


def test_a_queue_beyond_the_free_pages_adds_the_replicas_it_needs():
    assert decide(1, 1, queued_pages=250, free_pages=10, used_pages=90, **KW) == 4  # 240 short: 3 more
    assert decide(1, 1, queued_pages=50, free_pages=10, used_pages=90, **KW) == 2
    assert decide(2, 2, queued_pages=900, free_pages=0, used_pages=200, **KW) == 4  # capped at hi


def test_replicas_on_their_way_count_as_capacity():
    assert decide(1, 2, queued_pages=50, free_pages=10, used_pages=90, **KW) == 2  # the starting one will do
    assert decide(1, 2, queued_pages=150, free_pages=0, used_pages=100, **KW) == 3


def test_a_queue_that_fits_the_free_pages_waits_for_placement():
    assert decide(2, 2, queued_pages=30, free_pages=40, used_pages=160, **KW) == 2


def test_idle_capacity_scales_down_one_at_a_time_and_never_below_lo():
    assert decide(3, 3, queued_pages=0, free_pages=290, used_pages=10, **KW) == 2
    assert decide(3, 3, queued_pages=0, free_pages=150, used_pages=150, **KW) == 3  # would exceed low water
    assert decide(1, 1, queued_pages=0, free_pages=100, used_pages=0, **KW) == 1
    assert decide(2, 3, queued_pages=0, free_pages=200, used_pages=0, **KW) == 3  # not while one starts
    assert decide(1, 0, queued_pages=0, free_pages=100, used_pages=0, **KW) == 1
