"""The GPU path rehearsed on the CPU: the fallback block pool against vLLM's, the device check's dry run on a
simulated bare machine (PyTorch + Triton + pytest only), and device placement through a fake accelerator."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_engine import tiny_model
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from ff_engine.cache import PagePool
from ff_engine.cache.fallback_block_pool import FallbackBlockPool
from ff_engine.engine import Engine, SessionConfig
from ff_engine.errors import FFEngineError
from ff_engine.policies import make_policy

REPO = Path(__file__).resolve().parents[1]
#: what a bare CUDA machine does not have (torch's own dependencies -- sympy, jinja2, ... -- it does have)
MISSING = ["vllm", "safetensors", "av", "tqdm", "imageio_ffmpeg", "matplotlib", "PIL", "fastapi", "uvicorn",
           "starlette", "pydantic", "ray", "prometheus_client", "hypothesis", "diffusers", "transformers", "openai",
           "zmq", "msgspec", "xformers", "flash_attn", "httpx", "xgrammar"]
BLOCKER = f"""
import sys
from importlib.machinery import PathFinder

class _BarePathFinder(PathFinder):  # finds nothing of MISSING, as on a machine where it is not installed
    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name.split(".")[0] in {set(MISSING)!r}:
            return None
        return PathFinder.find_spec(name, path, target)

sys.meta_path[:] = [_BarePathFinder if f is PathFinder else f for f in sys.meta_path]
"""


def test_fallback_block_pool_hands_out_the_same_pages_as_vllm():
    from vllm.v1.core.block_pool import BlockPool

    rng = random.Random(0)
    ours, theirs = FallbackBlockPool(65), BlockPool(num_gpu_blocks=65, enable_caching=False, hash_block_size=16)
    held_o, held_t = [], []
    for _ in range(400):
        if held_o and rng.random() < 0.45:
            idx = sorted(rng.sample(range(len(held_o)), rng.randint(1, len(held_o))))
            ours.free_blocks([held_o[i] for i in idx])
            theirs.free_blocks([held_t[i] for i in idx])
            held_o = [b for i, b in enumerate(held_o) if i not in idx]
            held_t = [b for i, b in enumerate(held_t) if i not in idx]
        else:
            n = rng.randint(0, ours.get_num_free_blocks())
            a, b = ours.get_new_blocks(n), theirs.get_new_blocks(n)
            assert [x.block_id for x in a] == [x.block_id for x in b]
            held_o += a
            held_t += b
        assert ours.get_num_free_blocks() == theirs.get_num_free_blocks()
        assert [b.ref_cnt for b in ours.blocks] == [b.ref_cnt for b in theirs.blocks]
    with pytest.raises(ValueError):
        ours.get_new_blocks(ours.get_num_free_blocks() + 1)


def test_ci_uses_vllms_block_pool_even_when_the_fallback_is_allowed(monkeypatch):
    monkeypatch.setenv("FF_ENGINE_BLOCK_POOL", "fallback")
    assert type(PagePool(4)._pool).__module__ == "vllm.v1.core.block_pool"


def test_device_check_dry_run_on_a_bare_machine(tmp_path):
    """The one command the GPU machine runs, at toy sizes, where vLLM, safetensors, PyAV, tqdm, hypothesis ... cannot
    be imported: every stage runs, the engine runs on the fallback pool, the JSON names the device."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    env.pop("FF_ENGINE_BLOCK_POOL", None)
    out = tmp_path / "device_check.json"
    p = subprocess.run([sys.executable, "benchmarks/device_check.py", "--dry-run", "--out", str(out)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=600, check=False)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["device"] == "cpu" and r["env"]["vllm"] is False and r["env"]["block_pool"] == "fallback"
    assert set(r["stages"]) == {"tests", "kernels", "features", "throughput"}
    assert all(s["rc"] == 0 and not s["timed_out"] for s in r["stages"].values())
    kernels = r["stages"]["kernels"]["result"]
    assert kernels["attention"][0]["max_abs_err_vs_sdpa_fp32"] < 1e-4
    assert kernels["scoring"]["scoring_2_layers"]["max_abs_logit_err"] < 1e-4
    exps = r["stages"]["throughput"]["result"]["experiments"]
    assert set(exps) == {"window_1", "unbounded_1", "window_batch", "unbounded_batch", "future-forcing_1"}
    assert all(e["failed"] == 0 and e["latent_frames"] == 9 * e["streams"] for e in exps.values())
    feats = r["stages"]["features"]["result"]["checks"]
    fork = feats["fork"]
    assert "error" not in fork, fork
    assert fork["finite"] and fork["shared_pages_at_fork"] > 0 and fork["free_pages_after"] == fork["pool_pages"]
    assert fork["source_vs_solo_max_abs_diff"] < 1e-4 and fork["weights"].startswith("random")  # bare: no safetensors
    assert feats["rollback"]["regenerated_vs_first_max_abs_diff"] == 0.0
    assert feats["isolation"]["victim_finite"] and feats["isolation"]["victim_vs_alone_max_abs_diff"] == 0.0


# ---- device placement through a fake accelerator ----------------------------------------------------------
FAKE = torch.device("meta")


class FakeAccelerator(TorchFunctionMode):
    """Runs on the CPU but keeps track of which tensors would live on an accelerator (a tag; such a tensor reports
    ``device == meta``) and raises where CUDA would: an op mixing device tensors with CPU tensors that are not
    0-dim, except a device tensor indexed by CPU indices.  Factories given the fake device and ``.to(fake)`` make
    device tensors; ``.cpu()`` / ``.to("cpu")`` make CPU ones."""

    @staticmethod
    def on(t):
        return isinstance(t, torch.Tensor) and getattr(t, "_on_fake", False)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if getattr(func, "__self__", None) is torch.Tensor.device:
            return FAKE if self.on(args[0]) else func(*args)
        to_dev, to_cpu = False, func is torch.Tensor.cpu
        dev = kwargs.get("device")
        if isinstance(dev, (str, torch.device)):
            to_dev, to_cpu = torch.device(dev) == FAKE, torch.device(dev).type == "cpu"
            kwargs["device"] = "cpu"
        if func is torch.Tensor.to:
            new = [args[0]]
            for a in args[1:]:
                if isinstance(a, (str, torch.device)):
                    to_dev, to_cpu = torch.device(a) == FAKE, torch.device(a).type == "cpu"
                    a = "cpu"
                elif isinstance(a, torch.Tensor):
                    to_dev, to_cpu = self.on(a), not self.on(a)
                    a = a.dtype
                new.append(a)
            args = tuple(new)
        elif not (to_dev or to_cpu or func is torch.Tensor.copy_):
            self._check(func, args, kwargs)
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        out = func(*args, **kwargs)
        if out is None or func is torch.Tensor.__setitem__:
            return out
        tag = to_dev or (not to_cpu and any(self.on(t) for t in inputs))
        if tag == self.on(out) or not isinstance(out, (torch.Tensor, tuple, list)):
            return out

        def mark(t):
            if not isinstance(t, torch.Tensor):
                return t
            if any(t is i for i in inputs):  # a no-op move returned its input: the moved tensor is a new one
                t = t.clone()
            t._on_fake = tag
            return t
        return tree_map(mark, out)

    def _check(self, func, args, kwargs):
        flat = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        dev = [t for t in flat if self.on(t)]
        cpu = [t for t in flat if not self.on(t) and t.dim() > 0]
        if not dev or not cpu:
            return
        if func is torch.Tensor.__getitem__ and self.on(args[0]):
            return
        if func is torch.Tensor.__setitem__ and self.on(args[0]) and not (
                isinstance(args[2], torch.Tensor) and not self.on(args[2]) and args[2].dim() > 0):
            return
        raise RuntimeError(f"{getattr(func, '__name__', func)} mixes device and CPU tensors "
                           f"({[tuple(t.shape) for t in dev]} vs {[tuple(t.shape) for t in cpu]})")


class OnFake:
    """``device_check.OnDevice`` for the fake accelerator (the same four lines)."""

    def __init__(self, model):
        self.model = model

    def __getattr__(self, name):
        return getattr(self.model, name)

    def parameters(self):
        return self.model.parameters()

    def encode_prompt(self, text):
        return self.model.encode_prompt(text.to(FAKE))

    def forward(self, latents, timesteps, prompts, start_frames, attention):
        return self.model.forward(latents.to(FAKE), timesteps.to(FAKE), prompts, start_frames, attention).cpu()


def _generate_on_fake(policy: str, **params):
    m = tiny_model()
    for p in m.parameters():
        p._on_fake = True
    prompt = torch.randn(5, m.cfg.text_dim)
    with FakeAccelerator():
        e = Engine(OnFake(m), num_pages=200, page_size=4, backend="torch", device="meta")
        cfg = SessionConfig(prompt=prompt, num_frames=12, policy=make_policy(policy, **params), seed=1,
                            budget_frames=None if policy == "unbounded" else 6)
        return e.generate(cfg)


@pytest.mark.parametrize("policy", ["unbounded", "window"])
def test_engine_keeps_device_placement_with_the_policies_the_device_check_runs(policy):
    """Model and cache on the (fake) accelerator, noise and latents on the CPU, as ``device_check`` runs them."""
    assert _generate_on_fake(policy).shape[0] == 12  # 4 blocks: the last two writes evict


class DevicePlacementError(RuntimeError):
    pass


@pytest.mark.parametrize("policy, params", [
    ("future-forcing", {}),  # wide merge tolerances below: every removed token merges (the float64 group sums)
    ("future-forcing", {"form": "moment", "merge": "affine", "merge_key_tol": 1e3, "merge_value_tol": 1e3,
                        "page_candidates": True, "page_rank": "bound"}),
    ("future-forcing", {"form": "exact", "samples": 3, "merge_key_tol": 1e3, "merge_value_tol": 1e3,
                        "fused_scoring": True, "page_candidates": True}),
    ("expected-attention", {}),
    ("expected-attention-post-rope", {}),
    ("h2o", {"normalize": True}),
    ("snapkv", {"kernel": 3}),
], ids=["future-forcing", "ff-moment-affine-pages", "ff-exact-fused", "expected-attention", "ea-post-rope", "h2o",
        "snapkv"])
def test_policies_with_statistics_keep_device_placement(policy, params):
    """Query statistics, RoPE rotations, masks, merge buffers and accumulators all live on the cache's device."""
    try:
        assert _generate_on_fake(policy, **params).shape[0] == 12
    except FFEngineError as exc:
        if "mixes device and CPU tensors" in str(exc):
            raise DevicePlacementError(str(exc)) from exc
        raise
