"""Kernels against their torch references, and the references against the policy code they replace.

Without CUDA the Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, set when the kernel modules
are imported there), at small sizes; on a CUDA machine the same tests run the compiled kernels on the GPU, and the
``gpu``-marked tests add real sizes.
"""

import math

import pytest
import torch
from test_engine import tiny_model

from ff_engine.engine import Engine, SessionConfig
from ff_engine.policies import FutureForcing, PostRopeExpectedAttention
from kernels import compaction_ref, proxy_factors, scoring_ref

DEV = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter's numpy warns on log(0)


def _proxy(p, h, d, g, scale=0.3):
    mu = torch.randn(p, h, d, generator=g, dtype=torch.float64) * scale
    a = torch.randn(p, h, d, d, generator=g, dtype=torch.float64) * scale / math.sqrt(d)
    return mu, a @ a.transpose(-1, -2)


def _store(n_slots, hkv, d, g, dtype=torch.float32):
    return (torch.randn(n_slots, hkv, d, generator=g).to(dtype), torch.randn(n_slots, hkv, d, generator=g).to(dtype),
            torch.rand(n_slots, generator=g) * 2)


@pytest.mark.parametrize("p,h,hkv,cov_rank,value_norm,aggregation", [
    (1, 4, 2, 16, True, "mean"),     # Future Forcing's defaults (cheap form), GQA
    (1, 2, 2, None, True, "max"),    # the exact quadratic form
    (3, 2, 1, 8, False, "mean"),     # exact form: several sampled positions
])
def test_scoring_reference_equals_the_policy_code(p, h, hkv, cov_rank, value_norm, aggregation):
    g = torch.Generator().manual_seed(1)
    d, n_slots = 32, 90
    kc, vc, lm = _store(n_slots, hkv, d, g)
    slots = torch.randperm(n_slots, generator=g)[:60]
    mu_f, sigma_f = _proxy(p, h, d, g)
    rest = torch.randn(h, generator=g)
    ff = FutureForcing(cov_rank=cov_rank, value_norm=value_norm, aggregation=aggregation)
    logits = ff.scorer.head_logits(kc[slots], vc[slots], lm[slots], mu_f, sigma_f)
    want = ff.scorer.aggregate(logits, torch.logaddexp(torch.logsumexp(logits, 1), rest))
    u, lam = proxy_factors(sigma_f, cov_rank)
    seg = torch.tensor([0, 60])
    got_logits, _, got = scoring_ref.expected_attention_scores(kc, vc, lm, slots, seg, mu_f.float()[None], u[None],
                                                               lam[None], value_norm, aggregation, rest[None])
    assert torch.allclose(got_logits, logits, rtol=1e-5, atol=1e-4)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("dtype,d,h,hkv,r,p", [
    (torch.float32, 64, 4, 2, 16, 1),
    (torch.bfloat16, 48, 2, 2, 5, 2),  # head_dim and rank not powers of two: masked tiles
])
@pytest.mark.parametrize("aggregation", ["mean", "max"])
def test_triton_scoring_matches_reference(dtype, d, h, hkv, r, p, aggregation):
    from kernels import scoring_triton

    g = torch.Generator().manual_seed(2)
    kc, vc, lm = _store(200, hkv, d, g, dtype)
    slots = torch.randperm(200, generator=g)[:110]
    seg = torch.tensor([0, 40, 40, 110])  # three layers, one of them empty
    mus, us, lams = [], [], []
    for _ in range(3):
        mu_f, sigma_f = _proxy(p, h, d, g)
        u, lam = proxy_factors(sigma_f, r)
        mus.append(mu_f.float())
        us.append(u)
        lams.append(lam)
    args = [t.to(DEV) for t in (kc, vc, lm, slots, seg, torch.stack(mus), torch.stack(us), torch.stack(lams))]
    extra = torch.randn(3, h, generator=g).to(DEV)
    for ex in (None, extra):
        want = scoring_ref.expected_attention_scores(*args, True, aggregation, ex)
        got = scoring_triton.expected_attention_scores(*args, True, aggregation, ex)
        for a, b in zip(got, want, strict=True):
            assert torch.allclose(a.cpu(), b.cpu(), rtol=1e-5, atol=1e-5, equal_nan=False) or torch.equal(
                a.isinf(), b.isinf()) and torch.allclose(a[a.isfinite()].cpu(), b[b.isfinite()].cpu(), atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_compaction_copies_match_reference(dtype):
    from kernels import compaction_triton

    g = torch.Generator().manual_seed(3)
    kc, vc, lm = _store(120, 2, 64, g, dtype)
    pos = torch.randint(0, 99, (120, 3), generator=g, dtype=torch.int32)
    perm = torch.randperm(120, generator=g)
    src, dst = perm[:37], perm[37:74]
    new = (torch.randn(9, 2, 64, generator=g).to(dtype), torch.randn(9, 2, 64, generator=g).to(dtype),
           torch.randn(9, generator=g))
    got = [t.to(DEV) for t in (kc, vc, pos, lm)]
    want = [t.clone() for t in (kc, vc, pos, lm)]
    compaction_triton.move_slots(*got, src.to(DEV), dst.to(DEV))
    compaction_ref.move_slots(*want, src, dst)
    compaction_triton.write_slots(got[0], got[1], got[3], dst[:9].to(DEV), *(t.to(DEV) for t in new))
    compaction_ref.write_slots(want[0], want[1], want[3], dst[:9], *new)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("policy", ["future-forcing", "expected-attention-post-rope"])
def test_fused_scoring_flag_keeps_the_policy_decisions(policy):
    """The same stream with the policy's scoring routed through the fused kernel path generates the same video."""
    m = tiny_model()
    prompt = torch.randn(5, m.cfg.text_dim)
    outs = []
    for fused in (False, True):
        pol = (FutureForcing if policy == "future-forcing" else PostRopeExpectedAttention)(fused_scoring=fused)
        e = Engine(m, num_pages=200, page_size=4, backend="torch")
        outs.append(e.generate(SessionConfig(prompt=prompt, num_frames=12, policy=pol, budget_frames=6, seed=1)))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def test_the_cache_reaches_the_triton_compaction_kernel():
    """The wiring: under ``kernels.use("triton")`` the cache's compaction and merge-in-place call the Triton row
    copies (in Triton's interpreter here, compiled on CUDA) and the stream is bit-identical to the torch
    references' (a row copy is exact)."""
    from kernels import compaction_triton, use

    m = tiny_model()
    prompt = torch.randn(5, m.cfg.text_dim, generator=torch.Generator().manual_seed(2))
    calls = {"move_slots": 0, "write_slots": 0}
    outs = {}
    for impl in ("torch", "triton"):
        real = {n: getattr(compaction_triton, n) for n in calls}

        def spy(name, real=real):
            def f(*a):
                calls[name] += 1
                return real[name](*a)
            return f

        with use(impl), pytest.MonkeyPatch.context() as mp:
            for n in calls:
                mp.setattr(compaction_triton, n, spy(n))
            e = Engine(m, num_pages=200, page_size=4, backend="torch")
            outs[impl] = e.generate(SessionConfig(prompt=prompt, num_frames=15, seed=1, budget_frames=6,
                                                  policy=FutureForcing(merge="log-mass", merge_key_tol=8.0,
                                                                       merge_value_tol=8.0, sink_frames=0)))
            e.cache.check_invariants()
        if impl == "torch":
            assert calls == {"move_slots": 0, "write_slots": 0}  # CPU tensors, auto/torch: the references
    assert calls["move_slots"] > 0 and calls["write_slots"] > 0  # future-forcing evicts and merges
    assert torch.equal(outs["torch"], outs["triton"])


def test_kernel_choice_is_validated():
    from kernels import implementation, use

    assert implementation() in ("auto", "torch", "triton")
    with pytest.raises(ValueError, match="kernel implementation"), use("cuda-please"):
        pass


@pytest.mark.gpu
def test_triton_scoring_at_wan_sizes():
    """One layer's 21-frame cache at Wan shapes (32,760 tokens, 12 x 128 heads, rank 16, bf16 pages) on the GPU."""
    g = torch.Generator().manual_seed(4)
    from kernels import scoring_triton

    n_slots, h, d = 34_000, 12, 128
    kc, vc, lm = (t.cuda() for t in _store(n_slots, h, d, g, torch.bfloat16))
    slots = torch.randperm(n_slots, generator=g)[:32_760].cuda()
    mu_f, sigma_f = _proxy(1, h, d, g)
    u, lam = proxy_factors(sigma_f, 16)
    args = (kc, vc, lm, slots, torch.tensor([0, 32_760]).cuda(), mu_f.float()[None].cuda(), u[None].cuda(),
            lam[None].cuda(), True, "mean")
    got, want = scoring_triton.expected_attention_scores(*args), scoring_ref.expected_attention_scores(*args)
    assert torch.allclose(got[0], want[0], rtol=1e-4, atol=1e-3)
    assert torch.allclose(got[2], want[2], rtol=1e-3, atol=1e-9)
