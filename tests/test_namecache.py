"""tunnelpass.relay.namecache: the --dns name cache, with an injected lookup and clock."""

from twisted.internet import reactor
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.error import DNSLookupError
from twisted.internet.task import Clock
from twisted.trial import unittest

from tunnelpass.relay.namecache import NameCache, system_lookup


class Lookups:
    """An injected resolver: records each query, answered by the test."""

    def __init__(self):
        self.queries: list[tuple[str, Deferred]] = []

    def __call__(self, host):
        d = Deferred()
        self.queries.append((host, d))
        return d

    def answer(self, addresses, index=-1):
        self.queries[index][1].callback(addresses)

    def fail(self, index=-1):
        self.queries[index][1].errback(DNSLookupError("SERVFAIL"))


def result(d):
    box = []
    d.addBoth(box.append)
    return box[0] if box else None


class NameCacheTests(unittest.TestCase):
    def setUp(self):
        self.clock = Clock()
        self.lookups = Lookups()
        self.cache = NameCache(self.lookups, self.clock, ttl=300)

    def test_ip_literals_bypass_the_resolver(self):
        self.assertEqual(result(self.cache.resolve("127.0.0.3")), ["127.0.0.3"])
        self.assertEqual(result(self.cache.resolve("0:0::1")), ["::1"])
        self.assertEqual(self.lookups.queries, [])
        self.assertEqual(len(self.cache), 0)

    def test_a_name_is_resolved_once_per_ttl(self):
        first = self.cache.resolve("db.example")
        self.lookups.answer(["10.0.0.5", "2001:db8::5"])
        self.assertEqual(result(first), ["10.0.0.5", "2001:db8::5"])
        self.clock.advance(299)
        self.assertEqual(result(self.cache.resolve("DB.example.")), ["10.0.0.5", "2001:db8::5"])
        self.assertEqual(len(self.lookups.queries), 1, "answered from the cache within the TTL")
        self.clock.advance(1)
        again = self.cache.resolve("db.example")
        self.assertEqual(len(self.lookups.queries), 2, "looked up again once the TTL is over")
        self.lookups.answer(["10.0.0.6"])
        self.assertEqual(result(again), ["10.0.0.6"])
        self.assertEqual((self.cache.lookups, self.cache.hits), (2, 1))

    def test_concurrent_connections_share_one_lookup(self):
        waiters = [self.cache.resolve("db.example") for _ in range(3)]
        self.assertEqual(len(self.lookups.queries), 1)
        self.lookups.answer(["10.0.0.5"])
        self.assertEqual([result(d) for d in waiters], [["10.0.0.5"]] * 3)

    def test_a_failure_is_not_cached(self):
        waiters = [self.cache.resolve("db.example") for _ in range(2)]
        self.lookups.fail()
        for d in waiters:
            self.assertIsInstance(result(d).value, DNSLookupError)
        retry = self.cache.resolve("db.example")
        self.assertEqual(len(self.lookups.queries), 2, "the next connection asks again")
        self.lookups.answer(["10.0.0.5"])
        self.assertEqual(result(retry), ["10.0.0.5"])

    def test_an_empty_answer_is_a_failure(self):
        d = self.cache.resolve("db.example")
        self.lookups.answer([])
        self.assertIsInstance(result(d).value, DNSLookupError)
        self.assertEqual(len(self.cache), 0)

    def test_ttl_zero_looks_up_every_time(self):
        cache = NameCache(self.lookups, self.clock, ttl=0)
        for expected in (1, 2, 3):
            d = cache.resolve("db.example")
            self.assertEqual(len(self.lookups.queries), expected)
            self.lookups.answer(["10.0.0.5"])
            self.assertEqual(result(d), ["10.0.0.5"])
        self.assertEqual(len(cache), 0)

    def test_bounded_oldest_entry_goes_first(self):
        cache = NameCache(self.lookups, self.clock, ttl=300, max_entries=2)
        for name in ("a.example", "b.example", "c.example"):
            cache.resolve(name)
            self.lookups.answer(["10.0.0.1"])
        self.assertEqual(len(cache), 2)
        cache.resolve("c.example")
        self.assertEqual(len(self.lookups.queries), 3, "c is still cached")
        cache.resolve("a.example")
        self.assertEqual(len(self.lookups.queries), 4, "a was dropped for c")

    def test_a_cancelled_waiter_leaves_the_lookup_to_the_others(self):
        gone, staying = self.cache.resolve("db.example"), self.cache.resolve("db.example")
        gone.addErrback(lambda f: None)
        gone.cancel()
        self.lookups.answer(["10.0.0.5"])
        self.assertEqual(result(staying), ["10.0.0.5"])
        self.assertEqual(len(self.cache), 1, "the answer still fills the cache")


class FakeResolver:
    def __init__(self, addresses):
        self.addresses = addresses
        self.asked = []

    def resolveHostName(self, receiver, hostName, portNumber=0, addressTypes=None, transportSemantics="TCP"):
        self.asked.append(hostName)
        receiver.resolutionBegan(None)
        for address in self.addresses:
            receiver.addressResolved(address)
        receiver.resolutionComplete()


class SystemLookupTests(unittest.TestCase):
    def test_collects_both_families_once_each(self):
        fake = type("R", (), {})()
        fake.nameResolver = FakeResolver([IPv4Address("TCP", "10.0.0.5", 0), IPv6Address("TCP", "2001:db8::5", 0),
                                          IPv4Address("UDP", "10.0.0.5", 0)])
        self.assertEqual(result(system_lookup(fake)("db.example")), ["10.0.0.5", "2001:db8::5"])
        self.assertEqual(fake.nameResolver.asked, ["db.example"])

    def test_no_address_is_a_lookup_error(self):
        fake = type("R", (), {})()
        fake.nameResolver = FakeResolver([])
        failure = result(system_lookup(fake)("nowhere.invalid"))
        self.assertIsInstance(failure.value, DNSLookupError)
        self.assertIn("nowhere.invalid", failure.getErrorMessage())

    async def test_the_reactors_resolver_answers_off_the_reactor_thread(self):
        addresses = await system_lookup(reactor)("localhost")
        self.assertIn("127.0.0.1", addresses)
