"""Serving many streams: ``LocalService`` (one in-process engine) and ``RayCluster`` (one worker actor per GPU).

Both implement ``ff_engine.serving.contract.StreamService`` with the same router and worker code; see ``router`` for
placement, streaming, cancellation and recovery, ``worker`` for what one step does, ``streams`` for what is kept in
memory, ``persist`` for the on-disk layout.  ``RayCluster`` is imported lazily: ``LocalService`` needs no Ray.
"""

from ff_engine.serving.local import LocalService
from ff_engine.serving.model_spec import ModelSpec

__all__ = ["LocalService", "ModelSpec", "RayCluster"]


def __getattr__(name):
    if name == "RayCluster":
        from ff_engine.serving.cluster import RayCluster

        return RayCluster
    raise AttributeError(name)
