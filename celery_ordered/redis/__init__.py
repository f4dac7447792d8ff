"""Everything that knows Redis: URLs, clients, the keys of a stream, and the protocol.

- :mod:`~celery_ordered.redis.urls`: which Redis a URL names; masking passwords.
- :mod:`~celery_ordered.redis.clients`: one retrying redis-py client per URL.
- :mod:`~celery_ordered.redis.keys`: the names of a stream's keys.
- :mod:`~celery_ordered.redis.protocol`: one method per Lua script (``lua/``, each
  loaded behind ``lua/_prelude.lua``, the functions they share),
  the only code that runs commands on a stream's keys.
"""
