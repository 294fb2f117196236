"""A stand-in for vLLM's ``BlockPool`` on machines where vLLM cannot be installed, and only there.

Why it exists: our GPU verification machine has PyTorch + Triton and nothing else, no package registry, and takes
at most 64 MiB of carried files.  ``vllm.v1.core.block_pool`` cannot be carried as source: importing it pulls in
``vllm.distributed.kv_events`` (msgspec, zmq), ``vllm.v1.core.kv_cache_utils`` -> ``vllm.config`` (transformers,
pydantic, openai, fastapi, xgrammar ...), and a copy with those imports cut out would no longer be vLLM's code.
What ff-engine uses of the pool is small -- ``blocks``, ``get_new_blocks``, ``free_blocks``,
``get_num_free_blocks`` with prefix caching off -- so this module re-implements exactly that, with vLLM's
semantics (block 0 is the null block; allocation pops the head of the free queue; freed, uncached blocks are put
back at the head in the order given, vLLM's LIFO reuse).

Scope (the honest part): ``PagePool`` uses this class only when vLLM is not importable *and* the environment
says ``FF_ENGINE_BLOCK_POOL=fallback`` (``benchmarks/device_check.py`` sets it on such machines and records which
pool ran).  Everywhere else -- CI, users' clusters -- vLLM's real ``BlockPool`` is used, and
``tests/test_device_check.py`` checks on random operation sequences that both hand out the same page ids.
"""

from __future__ import annotations

from collections import deque

ENV_VAR = "FF_ENGINE_BLOCK_POOL"


class FallbackBlock:
    __slots__ = ("block_id", "is_null", "ref_cnt")

    def __init__(self, block_id: int):
        self.block_id, self.ref_cnt, self.is_null = block_id, 0, False


class FallbackBlockPool:
    """vLLM ``BlockPool(num_gpu_blocks, enable_caching=False, ...)`` restricted to what ``PagePool`` calls."""

    def __init__(self, num_gpu_blocks: int, enable_caching: bool = False, hash_block_size: int = 16):
        if not isinstance(num_gpu_blocks, int) or num_gpu_blocks < 1:
            raise ValueError(f"num_gpu_blocks must be an integer >= 1, got {num_gpu_blocks!r}")
        if enable_caching:
            raise ValueError("the fallback block pool has no prefix caching (enable_caching must be False)")
        self.blocks = [FallbackBlock(i) for i in range(num_gpu_blocks)]
        self._free = deque(self.blocks)
        self.null_block = self._free.popleft()
        self.null_block.is_null = True

    def get_new_blocks(self, num_blocks: int) -> list[FallbackBlock]:
        if num_blocks > len(self._free):
            raise ValueError(f"Cannot get {num_blocks} free blocks from the pool")
        out = [self._free.popleft() for _ in range(num_blocks)]
        for b in out:
            assert b.ref_cnt == 0, f"block {b.block_id} handed out twice"
            b.ref_cnt += 1
        return out

    def free_blocks(self, ordered_blocks) -> None:
        freed = []
        for b in ordered_blocks:
            b.ref_cnt -= 1
            if b.ref_cnt == 0 and not b.is_null:
                freed.append(b)
        self._free.extendleft(reversed(freed))  # the first freed block is the next one handed out (vLLM's order)

    def touch(self, blocks) -> None:
        """One more reference to each (held) block: a forked stream shares it (vLLM: a prefix-cache hit)."""
        for b in blocks:
            assert b.ref_cnt > 0 and not b.is_null, f"touch of free or null block {b.block_id}"
            b.ref_cnt += 1

    def get_num_free_blocks(self) -> int:
        return len(self._free)
