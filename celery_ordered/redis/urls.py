"""Redis URLs: which topology a URL names, where to connect, and masking its password.

One server (``redis://``, ``rediss://``, ``unix://``), a Redis Cluster
(``redis+cluster://host:port,host:port``) or Sentinel
(``sentinel://host:26379;sentinel://host2:26379/0``), told apart by the URL
(:func:`parse_redis_url`). :func:`mask_url` hides a password in any form
(user info, query arguments, every Sentinel part) for messages and reprs.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote

import redis
from redis.connection import parse_url

from ..errors import ConfigurationError

#: Port of a cluster node, or of a Sentinel, when the URL names none.
DEFAULT_REDIS_PORT = 6379
DEFAULT_SENTINEL_PORT = 26379

#: A unix socket as redis-py spells it, and as kombu (Celery's broker and backend) does.
UNIX_SCHEME = "unix://"
KOMBU_SOCKET_SCHEME = "redis+socket://"

_SINGLE_SCHEMES = ("redis://", "rediss://", UNIX_SCHEME, KOMBU_SOCKET_SCHEME)
_CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
SENTINEL_SCHEME = "sentinel://"
REDIS_SCHEMES = (*_SINGLE_SCHEMES, *_CLUSTER_SCHEMES, SENTINEL_SCHEME)

URL_FORMS = (
    "redis://host:6379/0 (rediss:// for TLS, unix:///path.sock for a socket), "
    "redis+cluster://host:7000,host:7001 (rediss+cluster:// for TLS) for a Redis "
    "Cluster, or sentinel://host:26379;sentinel://host2:26379/0 for Sentinel"
)


def socket_url(url: str, *, kombu: bool = False) -> str:
    """``url`` with a unix socket spelled for redis-py (``unix://``), or for kombu.

    redis-py names a socket ``unix:///path.sock``; kombu, and so Celery's
    broker and result backend, ``redis+socket:///path.sock``. The result uses
    ``redis+socket://`` when ``kombu`` is true, else ``unix://``; the path and
    query stay as they are, and a URL of any other scheme is returned unchanged.
    """
    old, new = (UNIX_SCHEME, KOMBU_SOCKET_SCHEME) if kombu else (KOMBU_SOCKET_SCHEME, UNIX_SCHEME)
    if url.startswith(old):
        return new + url[len(old) :]
    return url


def as_redis_url(url: Any) -> str | None:
    """``url`` if it names a Redis celery-ordered can use, else None."""
    if isinstance(url, (list, tuple)):
        if url and all(isinstance(u, str) and u.startswith(SENTINEL_SCHEME) for u in url):
            url = ";".join(url)  # kombu's list of Sentinels
        else:
            url = url[0] if url else None
    if not isinstance(url, str):
        return None
    text = url.strip()
    if not text.startswith(SENTINEL_SCHEME):
        # "redis://a;redis://b" is a broker's failover list: the first one.
        text = text.split(";")[0].strip()
    if not text.startswith(REDIS_SCHEMES):
        return None
    return socket_url(text)


@dataclass(frozen=True, repr=False)
class RedisTarget:
    """A Redis URL taken apart: which topology it names, and where to connect.

    ``kind`` is ``"single"``, ``"cluster"`` or ``"sentinel"``. ``nodes`` are
    the cluster's startup nodes or the Sentinels; ``node_url`` is the URL
    redis-py connects to for a single server, or to the first cluster node
    (with the credentials, TLS and options of the whole URL); ``options``
    holds what a Sentinel URL says about the primary (credentials, database).
    """

    kind: str
    url: str
    node_url: str = ""
    nodes: tuple[tuple[str, int], ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)
    master_name: str | None = None

    @property
    def where(self) -> str:
        """The nodes or Sentinels as ``host:port,...``, without credentials."""
        return ",".join(f"{host}:{port}" for host, port in self.nodes)

    def __repr__(self) -> str:
        options = {
            key: "***" if key == "password" else value for key, value in self.options.items()
        }
        return (
            f"RedisTarget(kind={self.kind!r}, url={mask_url(self.url)!r}, "
            f"node_url={mask_url(self.node_url)!r}, nodes={self.nodes!r}, "
            f"options={options!r}, master_name={self.master_name!r})"
        )


_HOST_PORT = re.compile(r"(?:\[(?P<ip6>[^\]]+)\]|(?P<host>[^:\[\]/?@,]+))(?::(?P<port>\d+))?")


#: Query arguments whose value is a secret (``?password=``, ``?sentinel_password=``...).
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&;][^=&;?#]*(?:pass|secret|token|auth|credential)[^=&;?#]*=)[^&;#]*",
    re.IGNORECASE,
)
#: Where a URL (one part of a Sentinel list) begins: ``scheme://``.
_URL_START = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


def mask_url(url: object) -> str:
    """``url`` as text fit for a message, a log line or a repr: no password in it.

    The password of the user part is replaced by ``***`` even when it holds an
    unencoded ``@``, ``/`` or ``:``, in every part of a ``;``-separated list
    (Sentinel, failover); so is the value of every query argument naming a
    secret (``?password=``, ``?sentinel_password=``, tokens). The user name,
    hosts, ports and database stay, to say which Redis is meant.
    """
    text = _SECRET_QUERY.sub(r"\g<key>***", str(url))
    starts = [match.start() for match in _URL_START.finditer(text)]
    if not starts:
        return text
    pieces = [text[: starts[0]]]
    for begin, end in zip(starts, [*starts[1:], len(text)], strict=True):
        pieces.append(_mask_userinfo(text[begin:end]))
    return "".join(pieces)


def tls_hint(url: str | None, exc: BaseException) -> str:
    """The fix for a TLS URL (``rediss://``) whose server did not answer in time, or "".

    A Redis without TLS on that port never answers the TLS handshake (it
    waits for the end of a command that never comes), so redis-py says only
    "Timeout connecting to server".
    """
    if not (url or "").strip().startswith(("rediss://", "rediss+cluster://")):
        return ""
    cause: BaseException | None = exc  # or what it was raised from (RedisUnavailable's)
    for _ in range(10):
        if cause is None:
            return ""
        if isinstance(cause, redis.TimeoutError):
            return (
                "if that port serves Redis without TLS, use redis:// (a rediss:// URL "
                "waits for a TLS handshake that a Redis without TLS never answers)"
            )
        cause = cause.__cause__
    return ""


def one_line(exc: BaseException) -> str:
    """``exc`` as one line of a message: its text with no password, no redis-py
    client repr, its whitespace collapsed and no closing period; else its class's name."""
    text = " ".join(without_client_reprs(mask_url(exc)).split()).rstrip(".")
    return text or type(exc).__name__


def without_client_reprs(text: str) -> str:
    """``text`` with each redis-py client's repr (``<redis.client.Redis(<...>)>``) cut out.

    redis-py's Sentinel errors quote the repr of every Sentinel's client
    (hundreds of characters of connection settings) before what went wrong
    with it; a message needs only the latter.
    """
    pieces, at = [], 0
    while (start := text.find("<redis.", at)) >= 0:
        depth, end = 0, start
        while end < len(text):
            depth += {"<": 1, ">": -1}.get(text[end], 0)
            end += 1
            if depth == 0:
                break
        pieces.append(text[at:start] + "a Sentinel")
        at = end
    pieces.append(text[at:])
    return "".join(pieces)


def _mask_userinfo(part: str) -> str:
    scheme_end = part.index("://") + 3
    rest = part[scheme_end:]
    # The host follows the last "@": a password may hold "@", "/" or ":" unencoded.
    userinfo, at, host = rest.rpartition("@")
    if not at:
        return part
    user, colon, _password = userinfo.partition(":")
    if not colon:
        return part  # a user name alone: nothing secret in it
    return f"{part[:scheme_end]}{user}:***@{host}"


def _split(rest: str) -> tuple[str, str, str]:
    """``netloc``, ``path`` and ``query`` of what follows ``scheme://``."""
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    return netloc, slash + path, query


def _host_ports(text: str, default_port: int, url: str) -> list[tuple[str, int]]:
    found = []
    for part in text.split(","):
        match = _HOST_PORT.fullmatch(part.strip())
        port = int(match["port"]) if match and match["port"] else default_port
        if match is None or not 0 < port < 65536:
            raise ConfigurationError(
                f"Redis URL {mask_url(url)!r}: {part.strip()!r} is not host:port"
            )
        found.append((match["ip6"] or match["host"], port))
    return found


def _node_url(scheme: str, userinfo: str, host: str, port: int, query: str) -> str:
    host = f"[{host}]" if ":" in host else host
    credentials = f"{userinfo}@" if userinfo else ""
    return f"{scheme}://{credentials}{host}:{port}/0" + (f"?{query}" if query else "")


def _parse_cluster(url: str) -> RedisTarget:
    scheme = "rediss" if url.startswith("rediss+") else "redis"
    netloc, path, query = _split(url.split("://", 1)[1])
    userinfo, _, hosts = netloc.rpartition("@")
    if not hosts:
        raise ConfigurationError(
            f"Redis Cluster URL {mask_url(url)!r} names no node: use "
            "redis+cluster://host:7000,host:7001 (any reachable nodes; the rest are found)"
        )
    nodes = _host_ports(hosts, DEFAULT_REDIS_PORT, url)
    if path.strip("/") not in ("", "0"):
        raise ConfigurationError(
            f"Redis Cluster URL {mask_url(url)!r} names database "
            f"{path.strip('/')!r}: a Redis Cluster has only database 0, so drop the /N"
        )
    node_url = _node_url(scheme, userinfo, *nodes[0], query)
    try:
        options = parse_url(node_url)
    except ValueError as exc:
        raise ConfigurationError(f"Redis Cluster URL {mask_url(url)!r}: {exc}") from exc
    if options.get("db", 0) != 0:
        raise ConfigurationError(
            f"Redis Cluster URL {mask_url(url)!r} asks for db={options['db']}: a "
            "Redis Cluster has only database 0"
        )
    _check_options(url, {key: value for key, value in options.items() if key != "db"})
    return RedisTarget("cluster", url, node_url=node_url, nodes=tuple(nodes))


def _parse_sentinel(url: str) -> RedisTarget:
    nodes: list[tuple[str, int]] = []
    options: dict[str, Any] = {}
    names: set[str] = set()
    chunks = [part.strip() for part in url.split(";") if part.strip()]
    for index, chunk in enumerate(chunks):
        if not chunk.startswith(SENTINEL_SCHEME):
            raise ConfigurationError(
                f"Sentinel URL {mask_url(url)!r}: {mask_url(chunk)!r} does "
                "not start with sentinel://; list the Sentinels as "
                "sentinel://host:26379;sentinel://host2:26379/0"
            )
        netloc, path, query = _split(chunk[len(SENTINEL_SCHEME) :])
        userinfo, _, host = netloc.rpartition("@")
        if not host or "," in host:
            raise ConfigurationError(
                f"Sentinel URL {mask_url(url)!r}: give one Sentinel per sentinel:// "
                "part, separated by ';', as Celery does: sentinel://host:26379;sentinel://host2:26379"
            )
        nodes += _host_ports(host, DEFAULT_SENTINEL_PORT, url)
        for key, values in parse_qs(query, keep_blank_values=True).items():
            if key != "master_name" or not values[-1]:
                raise ConfigurationError(
                    f"Sentinel URL {mask_url(url)!r}: unknown or empty option {key!r}; "
                    "the URL takes only ?master_name=NAME (other Sentinel options go in "
                    "app.conf.ordered_redis_transport_options)"
                )
            names.add(values[-1])
        if index == 0:
            # As Celery: the first part's credentials are the primary's.
            username, _, password = userinfo.partition(":")
            if username:
                options["username"] = unquote(username)
            if password:
                options["password"] = unquote(password)
        db = path.strip("/")
        if db:
            if not db.isdigit():
                raise ConfigurationError(
                    f"Sentinel URL {mask_url(url)!r}: the database {db!r} is not "
                    "a number; end a part with /0, /1..."
                )
            if options.setdefault("db", int(db)) != int(db):
                raise ConfigurationError(
                    f"Sentinel URL {mask_url(url)!r} names two databases: {options['db']} and {db}"
                )
    if len(names) > 1:
        raise ConfigurationError(
            f"Sentinel URL {mask_url(url)!r} names two masters: {sorted(names)}"
        )
    if not nodes:
        raise ConfigurationError(f"Sentinel URL {mask_url(url)!r} names no Sentinel")
    return RedisTarget(
        "sentinel", url, nodes=tuple(nodes), options=options, master_name=next(iter(names), None)
    )


def check_userinfo(url: str, what: str = "Redis URL") -> None:
    """Refuse ``url`` if its user part holds an unencoded ``/``, ``?`` or ``#``.

    URL parsers end the host part at the first of those, so a password
    holding one is cut, and its start read as a host or a port: the
    connection goes to the wrong place, and the parser's error quotes part
    of the password. The message quotes nothing of the URL.
    """
    rest = url.split("://", 1)[1] if "://" in url else url
    for part in rest.split(";"):  # each part of a Sentinel or failover list
        part = part.split("://", 1)[-1]
        if part.startswith("/"):
            continue  # a socket's path (unix:///run/redis@main.sock): no user part
        at = part.rfind("@")
        cut = min((i for i in (part.find(c) for c in "/?#") if i >= 0), default=-1)
        if at < 0 or not 0 <= cut < at:
            continue  # no "@" after a cut: whatever user part there is stays whole
        # An "@" in a query argument's value (?password=p@ss) is not a user part's:
        # then a host[:port] comes before the cut, and a ?name= after it. (A "="
        # alone proves nothing: base64 passwords end in "=".)
        if _HOST_PORT.fullmatch(part[:cut]) and _QUERY_ARGUMENT.search(part[cut:at]):
            continue
        raise ConfigurationError(
            f"the {what}'s user name or password holds an unencoded '/', '?' or '#': "
            "percent-encode them in the URL (%2F, %3F, %23)"
        )


#: Broker transports whose URLs kombu takes apart itself (and cuts as above).
#: Others hand theirs on whole (``sqla+``: SQLAlchemy's own parsing) or keep
#: their keys unencoded (Azure's), so their URLs are left alone.
_BROKER_SCHEMES_PARSED = frozenset(
    {"amqp", "amqps", "pyamqp", "librabbitmq", "redis", "rediss", "sentinel", "sqs"}
)


def check_broker_url(url: str, what: str = "broker URL") -> None:
    """:func:`check_userinfo` for each part of a broker URL whose transport kombu parses."""
    for part in url.split(";"):
        part = part.strip()
        if part.split("://", 1)[0].lower() in _BROKER_SCHEMES_PARSED:
            check_userinfo(part, what)


#: A query argument (``?name=``), as opposed to a ``=`` inside a password.
_QUERY_ARGUMENT = re.compile(r"[?&][\w.-]+=")


@functools.cache
def _connection_options(scheme: str) -> frozenset[str]:
    """The keyword arguments a client of ``scheme`` passes its pool and connections."""
    import inspect

    from redis.connection import (
        Connection,
        ConnectionPool,
        SSLConnection,
        UnixDomainSocketConnection,
    )

    connection = {"rediss": SSLConnection, "unix": UnixDomainSocketConnection}.get(
        scheme, Connection
    )
    names: set[str] = set()
    for cls in (*connection.__mro__, ConnectionPool):  # AbstractConnection's included
        init = vars(cls).get("__init__")
        if init is not None:
            names.update(inspect.signature(init).parameters)
    return frozenset(names - {"self", "args", "kwargs"})


@functools.cache
def _cluster_options() -> frozenset[str]:
    """The keyword arguments of redis-py's ``RedisCluster`` itself."""
    import inspect

    from redis.cluster import RedisCluster

    parameters = inspect.signature(RedisCluster.__init__).parameters
    return frozenset(set(parameters) - {"self", "args", "kwargs"})


def _check_options(url: str, options: Mapping[str, Any]) -> None:
    """Refuse a URL option the connection of ``url`` does not take, naming it (not its value).

    redis-py's URL parsing passes on any option; one the connection does not
    take fails only at the first connection, with a ``TypeError``, and a
    cluster client drops it in silence (a misspelt ``socket_timeout`` there
    is no timeout at all).
    """
    scheme = url.split("://", 1)[0]
    cluster = scheme.endswith("+cluster")
    taken = _connection_options(scheme.removesuffix("+cluster"))
    unknown = sorted(set(options) - taken - (_cluster_options() if cluster else set()))
    if not unknown:
        return
    if scheme in ("redis", "redis+cluster") and all(key.startswith("ssl") for key in unknown):
        fix = f"TLS options need a {scheme.replace('redis', 'rediss', 1)}:// URL"
    elif "virtual_host" in unknown:
        fix = "a socket's database is ?db=N for redis-py (kombu's virtual_host)"
    else:
        fix = (
            "remove them (the options are redis-py's connection arguments, such as "
            "socket_timeout, health_check_interval, or ssl_cert_reqs for rediss://)"
        )
    raise ConfigurationError(
        f"Redis URL {mask_url(url)!r}: option(s) {', '.join(unknown)} after '?' are not "
        f"taken by a {scheme}:// connection: {fix}"
    )


def parse_redis_url(url: str) -> RedisTarget:
    """Take a Redis URL apart, or raise :class:`~celery_ordered.ConfigurationError`.

    The forms, by topology:

    - one server: ``redis://[[user]:password@]host[:port][/db]``, ``rediss://``
      for TLS, ``unix:///path/redis.sock?db=N`` (or Celery's ``redis+socket://``);
    - Redis Cluster: ``redis+cluster://[[user]:password@]host[:port][,host[:port]...]``,
      ``rediss+cluster://`` for TLS: any reachable nodes (the others are
      discovered), database 0 only, redis-py's URL options after ``?``;
    - Sentinel: ``sentinel://[[user]:password@]host[:port][/db];sentinel://host[:port]...``
      as Celery and kombu spell it: one part per Sentinel, the first part's
      credentials and database are the primary's; the primary's name comes
      from ``?master_name=NAME`` or from the transport option ``master_name``.
    """
    if not isinstance(url, str):
        raise ConfigurationError(f"a Redis URL must be a str, got {type(url).__name__}")
    url = url.strip()
    check_userinfo(url)
    if url.startswith(_CLUSTER_SCHEMES):
        return _parse_cluster(url)
    if url.startswith(SENTINEL_SCHEME):
        return _parse_sentinel(url)
    url = socket_url(url)
    if url.startswith(_SINGLE_SCHEMES):
        try:
            options = parse_url(url)
        except ValueError as exc:
            raise ConfigurationError(f"Redis URL {mask_url(url)!r}: {exc}") from exc
        _check_options(url, options)
        if url.startswith(("redis://", "rediss://")):
            # The path ends the host part: a "/" in the user part was refused above.
            db = _split(url.split("://", 1)[1])[1].strip("/")
            if db and not db.isdigit():
                raise ConfigurationError(
                    f"Redis URL {mask_url(url)!r}: the database {db!r} is not a number; "
                    "end the URL with /0, /1..."
                )
        return RedisTarget("single", url, node_url=url)
    raise ConfigurationError(
        f"{mask_url(url)!r} is not a Redis URL celery-ordered knows: use {URL_FORMS}"
    )
