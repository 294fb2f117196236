"""Serving many streams: ``LocalService`` (one in-process engine), ``RayCluster`` (one worker actor per GPU, Ray
core) and ``ServeCluster`` (engine replicas on Ray Serve: replaced, autoscaled, drained).

Both implement ``ff_engine.serving.contract.StreamService`` with the same router and worker code; see ``router`` for
placement, streaming, cancellation and recovery, ``worker`` for what one step does, ``streams`` for what is kept in
memory, ``persist`` for the on-disk layout.  ``RayCluster`` and ``ServeCluster`` are imported lazily: ``LocalService`` needs no Ray.
"""

from ff_engine.serving.local import LocalService
from ff_engine.serving.model_spec import ModelSpec

__all__ = ["LocalService", "ModelSpec", "RayCluster", "ServeCluster"]


def __getattr__(name):
    if name == "RayCluster":
        from ff_engine.serving.cluster import RayCluster

        return RayCluster
    if name == "ServeCluster":
        from ff_engine.serving.serve import ServeCluster

        return ServeCluster
    raise AttributeError(name)
