"""The app's ASGI middlewares (``server/main.py`` installs them), by what they guard:

* :mod:`.connection`: the request head (its size, ``HEAD`` answered as ``GET``) and a 500 that
  keeps the connection usable;
* :mod:`.body`: the request body's byte limit while it streams in, and the replica header.

(Response counting is :class:`server.metrics.ResponseMetricsMiddleware`.)
"""
