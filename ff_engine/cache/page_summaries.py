"""Per-page summaries of the paged cache, kept current by the cache on every write (Future Forcing's page candidates
rank pages by them).

Ranking pages instead of tokens (Future Forcing's page candidates) needs a summary per page that is current
after every write: valid count, log total mass, key centroid per kv head and key radius (the largest distance of a
valid key from the centroid, so a page can be ranked by the most any of its tokens could score).
``PagedKVCache`` tells its ``PageSummaries`` about every page whose contents change (``refresh``, O(pages
touched)) or that leaves its table (``clear``).  They are kept from the cache's start, not from a policy's first
request: seeding them late would sum over other sets of pages at once than the incremental refreshes do, and
a float32 reduction of another shape may differ in the last bit, which could change page candidates (and merges).

``epoch`` [pages + 1] int64 changes whenever a page's contents change or it is freed: a consumer that caches
something derived from a page (the scorer's page importance) compares epochs to know it is stale, without the
cache keeping the consumer's data.
"""

from __future__ import annotations

import torch


class PageSummaries:
    def __init__(self, storage):
        self.storage = storage  # the cache's KVStorage: summaries are computed from it
        rows, self.page_size, hkv, d = storage.key_cache.shape
        dev = storage.key_cache.device
        self.valid = torch.zeros(rows, dtype=torch.int32, device=dev)
        self.page_log_mass = torch.full((rows,), float("-inf"), dtype=torch.float32, device=dev)
        self.centroid = torch.zeros((rows, hkv, d), dtype=torch.float32, device=dev)
        self.radius = torch.zeros((rows, hkv), dtype=torch.float32, device=dev)
        self.epoch = torch.zeros(rows, dtype=torch.int64, device=dev)
        self._clock = 0

    def _tick(self, ids: torch.Tensor) -> None:
        self._clock += 1
        self.epoch[ids] = self._clock

    def clear(self, pages) -> None:
        """Pages left their table (scrubbed to zero): summaries of an empty page."""
        idx = torch.as_tensor(pages, dtype=torch.int64, device=self.valid.device)
        self.valid[idx] = 0
        self.page_log_mass[idx] = float("-inf")
        self.centroid[idx] = 0
        self.radius[idx] = 0
        self._tick(idx)

    def refresh(self, ids: torch.Tensor, valid: torch.Tensor) -> None:
        """Recompute the summaries of pages ``ids`` [P] holding ``valid`` [P] tokens each (a prefix) from storage."""
        ps = self.page_size
        mask = torch.arange(ps, device=ids.device)[None, :] < valid[:, None]
        k = self.storage.key_cache[ids].float()
        partial = (valid < ps).nonzero().flatten()  # only a table's last page can be partial
        if partial.numel():  # select, never multiply by the mask: NaN * 0 is NaN
            k[partial] = k[partial].masked_fill(~mask[partial][:, :, None, None], 0.0)
        self.valid[ids] = valid
        self.centroid[ids] = k.sum(1) / valid.clamp_min(1)[:, None, None].float()
        dist = (k - self.centroid[ids][:, None]).norm(dim=-1)  # [pages, page, Hkv]
        self.radius[ids] = dist.masked_fill(~mask[:, :, None], 0.0).amax(1)
        lm = self.storage.log_mass[ids].masked_fill(~mask, float("-inf"))
        self.page_log_mass[ids] = torch.logsumexp(lm, dim=1)
        self._tick(ids)

    def of(self, ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Summaries of pages ``ids`` (a table's pages, in table order)."""
        return {"pages": ids, "valid": self.valid[ids], "log_mass": self.page_log_mass[ids],
                "centroid": self.centroid[ids], "radius": self.radius[ids], "epoch": self.epoch[ids]}
