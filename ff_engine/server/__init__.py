"""``ff-engine serve``: REST + WebSocket + viewer + Prometheus over a ``StreamService`` (see ``app.py``)."""

from ff_engine.server.settings import ServerSettings


def create_app(settings: ServerSettings, runtime=None):
    from ff_engine.server.app import create_app as _create

    return _create(settings, runtime)


__all__ = ["ServerSettings", "create_app"]
