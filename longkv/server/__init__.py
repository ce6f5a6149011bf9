"""``longkv serve``: an OpenAI-compatible HTTP server with a token-level prefix cache.

Layers: :mod:`~longkv.server.app` (HTTP <-> engine jobs, nothing else),
:mod:`~longkv.server.worker` (the engine thread, the queue, request planning),
the radix prefix index (:mod:`~longkv.kv.radix`), :mod:`~longkv.server.metrics`
(Prometheus) and :mod:`~longkv.server.schemas` (the API's pydantic models).
Needs the ``serve`` extra: ``pip install 'longkv[serve]'``.
"""
