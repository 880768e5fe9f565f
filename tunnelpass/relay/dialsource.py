# -*- test-case-name: tests.test_dialsource -*-
"""How targets are dialled: the source address (``--dial``, NodePass's
``dial=``) and the name cache (``--dns``), in one per-instance :class:`Dialer`.

``--dial IP`` makes every dial of a target (TCP connections and the UDP
sessions' sockets) leave from *IP*, for multi-homed hosts whose firewalls or
policy routes key on the source.  ``auto`` (or empty) leaves the choice to
the kernel, as before.  Unlike NodePass, which silently falls back to
``auto`` when its address cannot be used, a bad ``--dial`` is an error: a
firewall rule written for the source address would otherwise be bypassed
without a word.

* The address must belong to this host: checked at startup by binding a
  socket to it (:func:`check_local`), one line and exit if not.
* Its family must match the target's.  A target given as an IP literal of
  the other family fails at startup (:meth:`Dialer.check`); a name is only
  known at dial time, so its addresses of the other family are skipped, and
  a name with none of ours fails that one connection with
  :class:`DialSourceError` (a connect failure with the reason in the log).

Names are resolved through the instance's
:class:`~tunnelpass.relay.namecache.NameCache`; TCP then dials the usable
addresses with Twisted's ``HostnameEndpoint`` (Happy Eyeballs), fed the
cached answer instead of a fresh lookup.
"""

from __future__ import annotations

import errno
import socket

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.endpoints import HostnameEndpoint
from twisted.internet.interfaces import IHostnameResolver, IHostResolution, IReactorPluggableNameResolver
from zope.interface import implementer

from tunnelpass.relay.namecache import DEFAULT_TTL, NameCache, literal, system_lookup
from tunnelpass.config.settings import _show, format_address

#: --dial values that mean "let the kernel choose".
AUTO = ("", "auto")


class DialSourceError(Exception):
    """A target that cannot be dialled from the ``--dial`` address."""


def family(ip: str) -> str:
    return "IPv6" if ":" in ip else "IPv4"


def describe_os_error(error: OSError) -> str:
    """``Cannot assign requested address (EADDRNOTAVAIL)``: the text and the errno's name."""
    name = errno.errorcode.get(error.errno or 0)
    text = error.strerror or str(error)
    return f"{text} ({name})" if name else text


def check_local(ip: str) -> None:
    """Raise ValueError unless a socket can be bound to *ip* (an address of
    this host, or a wildcard)."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
    except OSError as e:
        raise ValueError(f"{ip} is not an address of this host (bind: {describe_os_error(e)})") from None


def parse_dial(text: str) -> str | None:
    """``--dial``: None for ``auto``/empty, else a normalized IP literal that
    is an address of this host (ValueError otherwise)."""
    value = text.strip() if isinstance(text, str) else ""
    if value.lower() in AUTO:
        return None
    ip = literal(value[1:-1] if value.startswith("[") and value.endswith("]") else value)
    if ip is None:
        raise ValueError(f"{_show(text)} is not an IP address (give an address of this host, or auto)")
    check_local(ip)
    return ip


def check_target(source: str | None, host: str, port: int) -> None:
    """Startup: raise ValueError if *host* is an IP literal of the other
    family than the ``--dial`` *source* (a name is checked when dialled)."""
    ip = literal(host)
    if source is not None and ip is not None and family(ip) != family(source):
        raise ValueError(f"--dial {source} is {family(source)} but target {format_address(ip, port)} "
                         f"is {family(ip)}: give a source address of the target's family")


@implementer(IHostResolution)
class _Resolution:
    def __init__(self, name: str):
        self.name = name

    def cancel(self) -> None:
        pass  # already complete


@implementer(IHostnameResolver)
class _Answer:
    """An IHostnameResolver that gives the addresses it was made with."""

    def __init__(self, addresses: list[str]):
        self.addresses = addresses

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):
        resolution = _Resolution(hostName)
        receiver.resolutionBegan(resolution)
        for ip in self.addresses:
            kind = IPv6Address if ":" in ip else IPv4Address
            receiver.addressResolved(kind("TCP", ip, portNumber))
        receiver.resolutionComplete()
        return resolution


@implementer(IReactorPluggableNameResolver)
class _Resolved:
    """The reactor, as seen by one HostnameEndpoint: its name resolver
    answers from the name cache; everything else is the real reactor."""

    def __init__(self, reactor, addresses: list[str]):
        self._reactor = reactor
        self.nameResolver = _Answer(addresses)

    def installNameResolver(self, resolver):
        raise NotImplementedError("a per-dial view of the reactor")

    def __getattr__(self, name):
        return getattr(self._reactor, name)


class Dialer:
    """The instance's way to reach targets: from *source* (an IP literal of
    this host, or None for the kernel's choice), with names resolved
    through *cache*."""

    def __init__(self, reactor, source: str | None, cache: NameCache):
        self.reactor = reactor
        self.source = source
        self.cache = cache

    @classmethod
    def create(cls, reactor, source: str | None = None, ttl: float = DEFAULT_TTL) -> "Dialer":
        """The production dialer: the system resolver, via the reactor."""
        return cls(reactor, source, NameCache(system_lookup(reactor), reactor, ttl))

    @property
    def bind_address(self):
        """``bindAddress`` for ``connectTCP``/``HostnameEndpoint``."""
        return None if self.source is None else (self.source, 0)

    def fits(self, ip: str) -> bool:
        """Whether an address can be dialled from the source."""
        return self.source is None or family(ip) == family(self.source)

    def usable(self, addresses: list[str], host: str) -> list[str]:
        """*addresses* of *host* that the source can reach; DialSourceError if none."""
        fitting = [ip for ip in addresses if self.fits(ip)]
        if not fitting:
            theirs = family(addresses[0])
            if literal(host) is not None:
                what = f"target {host} is {theirs}"
            else:
                shown = ", ".join(addresses[:4]) + (", ..." if len(addresses) > 4 else "")
                what = f"target {host} resolves only to {theirs} ({shown})"
            raise DialSourceError(f"{what} but --dial {self.source} is {family(self.source)}")
        return fitting

    def addresses(self, host: str):
        """Deferred: the usable addresses of *host* (a name or a literal)."""
        return self.cache.resolve(host).addCallback(self.usable, host)

    def resolve_udp(self, host: str, port: int):
        """Deferred: the ``(ip, port)`` a UDP session to *host* connects to."""
        return self.addresses(host).addCallback(lambda addresses: (addresses[0], port))

    def udp_interface(self, ip: str) -> str:
        """The address a UDP session's socket to *ip* binds to."""
        return self.source or ("::" if ":" in ip else "0.0.0.0")

    def connect_tcp(self, host: str, port: int, factory, timeout: float):
        """Deferred: a protocol from *factory* connected to *host*, after a
        lookup through the cache (a literal skips it), from the source
        address; Happy Eyeballs over the usable addresses."""

        def connect(addresses):
            endpoint = HostnameEndpoint(_Resolved(self.reactor, addresses), host, port, timeout=timeout,
                                        bindAddress=self.bind_address)
            return endpoint.connect(factory).addErrback(unreachable)

        def unreachable(reason):
            self.cache.forget(host)  # every cached address failed: ask again next time
            return reason

        return self.addresses(host).addCallback(connect)
