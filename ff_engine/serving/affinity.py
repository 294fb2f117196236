"""``AffinityRequestRouter``: Ray Serve's pluggable request router for the engine replicas (``serve.py``).

* A request naming a replica (the ``replica=`` keyword, which every call of the router's endpoints carries) goes
  to that replica and no other: the one that holds the stream's KV cache (session affinity).  When that replica
  is not running, it is not routed anywhere (the endpoint notices and reports the replica lost).
* A request naming none goes to the replica with the most free pages (its ``record_routing_stats``), ties to
  fewer streams, then name — the router's own placement rule.
* It publishes the running replicas Serve tells it about (``replica_set``), from which ``ServeCluster`` learns
  that one joined or left.

Serve pickles this module *by value* into every process that routes (``RequestRouterConfig``), so it holds no
state of its own: the replica set lives in ``replica_set``, imported at call time (by reference).
"""

from __future__ import annotations

from ray.serve.request_router import FIFOMixin, RequestRouter


class AffinityRequestRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, **kwargs) -> None:
        pass

    def update_replicas(self, replicas) -> None:
        super().update_replicas(replicas)
        from ff_engine.serving import replica_set

        replica_set.publish(self._deployment_id.app_name, self._deployment_id.name,
                            {r.replica_id.unique_id for r in replicas})

    async def choose_replicas(self, candidate_replicas, pending_request=None):
        want = (pending_request.kwargs or {}).get("replica") if pending_request is not None else None
        if want is not None:
            pending_request.routing_context.should_backoff = True
            pinned = [r for r in candidate_replicas if r.replica_id.unique_id == want]
            return [pinned] if pinned else []

        def most_free(r):
            stats = r.routing_stats or {}
            return -stats.get("free_pages", 0), stats.get("streams", 0), r.replica_id.unique_id

        return [[r] for r in sorted(candidate_replicas, key=most_free)]
