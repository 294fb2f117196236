import time

import torch.nn.functional as F


def until(cond, timeout: float = 60.0, poll: float = 0.01, what: str = "condition not met in time") -> None:
    """Poll ``cond`` until it holds; fail with ``what`` after ``timeout`` s (a router thread, a Ray worker or a
    server acts on its own clock, which a loaded machine stretches)."""
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, what
        time.sleep(poll)


def dense_attention(layer, q, k, v, q_pre, positions):
    """Block-only attention (empty cache) for unit tests of the model math."""
    return F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                          v.transpose(0, 1)[None])[0].transpose(0, 1)
