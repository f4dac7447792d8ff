"""Separate hosts on one machine: Linux network namespaces joined by veth links.

A :class:`Network` makes one network namespace per host and links each to the
root namespace (where the test, its Redis and its consumer run) by a veth
pair of its own: a point-to-point /30 whose root end is the host's way to the
server, and whose host end is the host's ``eth0``. A host sees nothing of the
machine's network but that link and its own loopback, so a worker started in
it (:meth:`Host.popen`) reaches the test's Redis only over the link, as a
separate machine on a LAN would; :meth:`Host.cut` pulls its cable.

Needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2; :func:`probe`
says why this machine cannot do it. Names carry the pid of the process that
made them, so a run removes what a crashed earlier run left behind
(:func:`remove_stale`) without touching the namespaces of a run going on
alongside it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Prefix of every namespace made here: ``co-hosts-<owner pid>-<tag>-<host>``.
PREFIX = "co-hosts-"

#: Prefix of the root ends of the veth links: ``coh<tag><index>`` (<= 15 characters).
LINK_PREFIX = "coh"

#: How long the processes of a powered-off host may take to disappear.
GONE_TIMEOUT = 20.0

_NAME = re.compile(rf"^{PREFIX}(?P<pid>\d+)-(?P<tag>[0-9a-f]+)-")

#: Namespaces this process has made and not yet removed.
_ACTIVE: set[str] = set()


class NetnsError(RuntimeError):
    """An ``ip`` command failed; the message holds the command and its error."""


def ip(*args: str) -> str:
    """Run ``ip ARGS...`` and return its output; raise NetnsError when it fails."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise NetnsError(f"`ip {' '.join(args)}` failed: {done.stderr.strip() or done.stdout}")
    return done.stdout


def probe() -> str | None:
    """Why network namespaces with veth links cannot be made here, or None if they can.

    Makes a namespace, links it to the root namespace, runs a program in it
    and removes it all: what a :class:`Network` needs, so that a failure
    after a successful probe is a real failure and not a limit of the machine.
    """
    tag = uuid.uuid4().hex[:6]
    name, link = f"{PREFIX}{os.getpid()}-{tag}-probe", f"{LINK_PREFIX}{tag}p"
    try:
        ip("netns", "add", name)
    except (NetnsError, OSError) as exc:
        return f"cannot make a network namespace: {exc}"
    try:
        ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", name)
        ip("netns", "exec", name, "ip", "link", "set", "lo", "up")
    except NetnsError as exc:
        return f"cannot link a network namespace to this one: {exc}"
    finally:
        with contextlib.suppress(NetnsError):
            ip("link", "del", link)
        with contextlib.suppress(NetnsError):
            ip("netns", "del", name)
    return None


def _netns_id(path: str) -> tuple[int, int]:
    """(device, inode) of a network namespace file: equal means the same namespace."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def pids_in(netns_path: str) -> set[int]:
    """Processes whose network namespace is the one at ``netns_path``."""
    wanted = _netns_id(netns_path)
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):  # gone, or a zombie (no namespace left)
                if _netns_id(f"/proc/{entry}/ns/net") == wanted:
                    found.add(int(entry))
    return found


def _kill_all_in(netns_path: str, timeout: float = GONE_TIMEOUT) -> None:
    """SIGKILL every process in a namespace; wait until none is left."""
    deadline = time.monotonic() + timeout
    while True:
        living = pids_in(netns_path)
        if not living:
            return
        if time.monotonic() > deadline:
            raise NetnsError(f"processes {sorted(living)} in {netns_path} outlived SIGKILL")
        for pid in living:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.02)  # a killed process leaves its namespace when the kernel reaps it


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _namespaces() -> list[str]:
    """Names of the machine's named network namespaces."""
    return [line.split()[0] for line in ip("netns", "list").splitlines() if line.strip()]


def _links() -> list[str]:
    """Names of the root namespace's network interfaces."""
    return [link["ifname"] for link in json.loads(ip("-j", "link", "show") or "[]")]


def remove_stale() -> list[str]:
    """Remove namespaces (and their links) left by runs that are gone; their names.

    A namespace is stale when the process named in it is dead, or is this one
    but no live :class:`Network` of it owns the namespace (left by an earlier
    test of this process, or by a dead process whose pid came back). Any
    process still running in a stale namespace, such as a worker whose test
    crashed, is killed first.
    """
    removed = []
    for name in _namespaces():
        match = _NAME.match(name)
        if match is None or name in _ACTIVE:
            continue
        owner = int(match["pid"])
        if owner != os.getpid() and _pid_alive(owner):
            continue
        with contextlib.suppress(FileNotFoundError):
            _kill_all_in(f"/run/netns/{name}")
        for link in _links():
            if link.startswith(LINK_PREFIX + match["tag"]):
                with contextlib.suppress(NetnsError):
                    ip("link", "del", link)
        with contextlib.suppress(NetnsError):
            ip("netns", "del", name)
        removed.append(name)
    return removed


def _free_subnet() -> ipaddress.IPv4Network:
    """A random /24 in 10.128.0.0/9 that no route of this machine touches."""
    taken = []
    for route in json.loads(ip("-4", "-j", "route", "show", "table", "all") or "[]"):
        with contextlib.suppress(ValueError):
            taken.append(ipaddress.ip_network(route.get("dst", ""), strict=False))
    for _ in range(100):
        candidate = ipaddress.IPv4Network(
            f"10.{random.randint(128, 254)}.{random.randint(0, 255)}.0/24"
        )
        if not any(candidate.overlaps(net) for net in taken):
            return candidate
    raise NetnsError("no free /24 found in 10.128.0.0/9 for the test network")


@dataclass
class Host:
    """One host: a network namespace linked to the root namespace.

    ``address`` is the host's own address (on its ``eth0``); ``server_address``
    is the root end of its link, where it reaches servers of the root
    namespace; ``link`` is that root end's interface name.
    """

    name: str
    netns: str
    link: str
    address: str
    server_address: str
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)

    @property
    def netns_path(self) -> str:
        """The file naming the host's namespace (``/run/netns/<netns>``)."""
        return f"/run/netns/{self.netns}"

    @property
    def netns_inode(self) -> int:
        """Inode of the host's namespace: what ``/proc/self/ns/net`` shows inside it."""
        return os.stat(self.netns_path).st_ino

    @property
    def prefix(self) -> list[str]:
        """The command that runs a program inside the host: ``ip netns exec <netns>``."""
        return ["ip", "netns", "exec", self.netns]

    def adopt(self, proc: subprocess.Popen[bytes]) -> None:
        """Count ``proc`` (run under :attr:`prefix`) as the host's: :meth:`power_off` reaps it."""
        self._procs.append(proc)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[bytes]:
        """Start ``argv`` inside the host (``ip netns exec``); keyword args go to Popen.

        ``ip netns exec`` replaces itself with the program, so the Popen's pid
        is the program's. :meth:`power_off` kills and reaps it.
        """
        proc = subprocess.Popen([*self.prefix, *argv], **kwargs)
        self.adopt(proc)
        return proc

    def can_connect(self, address: str, port: int, timeout: float = 1.0) -> bool:
        """Whether a TCP connection from inside the host to ``address:port`` opens."""
        code = (
            "import socket, sys; "
            "socket.create_connection((sys.argv[1], int(sys.argv[2])), float(sys.argv[3]))"
        )
        argv = ["ip", "netns", "exec", self.netns, sys.executable, "-c", code]
        done = subprocess.run(
            [*argv, address, str(port), str(timeout)], capture_output=True, timeout=timeout + 30
        )
        return done.returncode == 0

    def cut(self) -> None:
        """Pull the host's cable: its link goes down, its processes keep running."""
        ip("link", "set", self.link, "down")

    def heal(self) -> None:
        """Plug the cable back in."""
        ip("link", "set", self.link, "up")

    def power_off(self) -> None:
        """SIGKILL every process in the host, as a power cut would; reap the ones started here."""
        for proc in self._procs:  # even one that never got into the namespace
            if proc.poll() is None:
                proc.kill()
        _kill_all_in(self.netns_path)
        for proc in self._procs:
            proc.wait(timeout=GONE_TIMEOUT)


class Network:
    """Hosts in network namespaces of their own, each linked to this namespace.

    ::

        with Network(["host-a", "host-b"]) as net:
            net["host-a"].popen([...])

    On exit every process in the hosts is killed and every namespace and link
    is removed, whatever happened inside; stale ones from crashed runs are
    removed on entry.
    """

    def __init__(self, names: Sequence[str]) -> None:
        if len(set(names)) != len(names) or not names:
            raise ValueError(f"host names must be distinct and at least one: {names!r}")
        self.names = list(names)
        self.tag = uuid.uuid4().hex[:6]
        self.hosts: dict[str, Host] = {}

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts.values())

    @property
    def server_addresses(self) -> list[str]:
        """The root ends of every link: where a server must listen for the hosts."""
        return [host.server_address for host in self]

    def __enter__(self) -> Network:
        remove_stale()
        subnet = _free_subnet()
        try:
            for index, name in enumerate(self.names):
                self._add(index, name, subnet)
        except BaseException:
            self.close()
            raise
        return self

    def _add(self, index: int, name: str, subnet: ipaddress.IPv4Network) -> None:
        netns = f"{PREFIX}{os.getpid()}-{self.tag}-{name}"
        link = f"{LINK_PREFIX}{self.tag}{index}"
        server, address = subnet[4 * index + 1], subnet[4 * index + 2]
        ip("netns", "add", netns)
        _ACTIVE.add(netns)
        host = Host(name, netns, link, str(address), str(server))
        self.hosts[name] = host
        # The peer is made inside the namespace: no moment where it is loose here.
        ip("link", "add", link, "type", "veth", "peer", "name", "eth0", "netns", netns)
        ip("addr", "add", f"{server}/30", "dev", link)
        ip("link", "set", link, "up")
        inside = ("netns", "exec", netns, "ip")
        ip(*inside, "addr", "add", f"{address}/30", "dev", "eth0")
        ip(*inside, "link", "set", "eth0", "up")
        ip(*inside, "link", "set", "lo", "up")

    def close(self) -> None:
        """Kill everything in the hosts; remove their links and namespaces (idempotent).

        Raises NetnsError if a namespace or link is still there afterwards.
        """
        errors = []
        for host in list(self.hosts.values()):
            try:
                host.power_off()
            except (NetnsError, subprocess.TimeoutExpired, FileNotFoundError) as exc:
                errors.append(str(exc))
            with contextlib.suppress(NetnsError):
                ip("link", "del", host.link)  # both ends go, at once
            try:
                ip("netns", "del", host.netns)
            except NetnsError as exc:
                errors.append(str(exc))
            _ACTIVE.discard(host.netns)
        names = {host.netns for host in self.hosts.values()}
        links = {host.link for host in self.hosts.values()}
        self.hosts.clear()
        left = (names & set(_namespaces())) | (links & set(_links()))
        if left:
            errors.append(f"still there after removal: {sorted(left)}")
        if errors:
            raise NetnsError("; ".join(errors))

    def __exit__(self, *exc_info: object) -> None:
        self.close()
