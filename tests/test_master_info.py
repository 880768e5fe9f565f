# -*- test-case-name: tests.test_master_info -*-
"""``/info``'s /proc parsers (real-looking and hostile fixtures), the CPU
share between calls, and ``/tcping`` (target checks, a listening and a
closed loopback port, the deadline, the cap on probes at once)."""

from __future__ import annotations

import os
import socket

from twisted.internet import reactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock
from twisted.trial import unittest

from tunnelpass.master import info
from tunnelpass.master.errors import ApiError
from tunnelpass.master.tcping import TCPing, parse_target

STAT = """cpu  1000 50 500 8000 200 0 30 0 0 0
cpu0 500 25 250 4000 100 0 15 0 0 0
intr 123456 0 0
ctxt 99999
"""
STAT_LATER = """cpu  1600 50 700 8100 300 0 30 0 0 0
"""
MEMINFO = """MemTotal:        8000000 kB
MemFree:          500000 kB
MemAvailable:    6000000 kB
Buffers:          100000 kB
SwapTotal:       2000000 kB
SwapFree:        1500000 kB
HugePages_Total:       0
"""
NET_DEV = """Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo: 4110612927951 331222339    0    0    0     0          0         0 4110612927951 331222339    0    0    0     0       0          0
  eth0: 1000 10 0 0 0 0 0 0 2000 20 0 0 0 0 0 0
  ens3:  500  5 0 0 0 0 0 0  700  7 0 0 0 0 0 0
docker0: 9999 1 0 0 0 0 0 0 9999 1 0 0 0 0 0 0
vethab12: 8888 1 0 0 0 0 0 0 8888 1 0 0 0 0 0 0
br-1234: 7777 1 0 0 0 0 0 0 7777 1 0 0 0 0 0 0
 myvirt: 6666 1 0 0 0 0 0 0 6666 1 0 0 0 0 0 0
"""
DISKSTATS = """   7       0 loop0 10 0 100 0 0 0 0 0 0 0 0 0 0 0 0 0 0
   8       0 sda 100 0 1000 50 200 0 2000 60 0 100 110 0 0 0 0 0 0
   8       1 sda1 90 0 900 40 190 0 1900 50 0 90 90 0 0 0 0 0 0
 259       0 nvme0n1 10 0 10 1 20 0 20 1 0 1 1
 259       1 nvme0n1p1 5 0 5 1 10 0 10 1 0 1 1
 253       0 dm-0 100 0 100000 0 100 0 100000 0 0 0 0
   9       0 md0 100 0 100000 0 100 0 100000 0 0 0 0
 252       0 vda 1 0 1 0 1 0 1 0 0 0 0
 179       1 mmcblk0p1 1 0 4 0 1 0 4 0 0 0 0
 251       0 zram0 1 0 4 0 1 0 4 0 0 0 0
"""
HOSTILE = ["", "\x00\x00\xff", "cpu", "cpu a b c d", "cpu -1 -2 -3 -4", "cpu 1 2 3\n",
           "MemTotal: lots kB\nMemTotal: 99999999999999999999999999 kB", ":::::\n: 1 2 3",
           "eth0: 1 2 3", "eth0: x 0 0 0 0 0 0 0 y 0", "8 0 sda 1 2 3", "8 0 sda a b c d e f g h i j k",
           "9" * 5000, "\n".join(["cpu 1 1 1 1"] * 3), "-1.5 3", "1e9 0", "12345.67.8 1", "nan"]


class ProcParserTests(unittest.TestCase):
    def test_cpu_share_between_samples(self):
        first, later = info.parse_cpu(STAT), info.parse_cpu(STAT_LATER)
        self.assertEqual(first, (8200, 9780))
        self.assertEqual(later, (8400, 10780))
        self.assertEqual(info.cpu_percent(first, later), 80)  # 1000 jiffies, 200 idle

    def test_cpu_unknown(self):
        sample = info.parse_cpu(STAT)
        self.assertEqual(info.cpu_percent(None, sample), -1)
        self.assertEqual(info.cpu_percent(sample, None), -1)
        self.assertEqual(info.cpu_percent(sample, sample), -1)  # no time passed
        self.assertEqual(info.cpu_percent((10, 100), (5, 200)), -1)  # idle went back: counters wrapped
        self.assertIsNone(info.parse_cpu("cpu0 1 2 3 4\n"))

    def test_meminfo(self):
        self.assertEqual(info.parse_meminfo(MEMINFO), {"mem_total": 8000000 * 1024, "mem_used": 2000000 * 1024,
                                                       "swap_total": 2000000 * 1024, "swap_used": 500000 * 1024})

    def test_meminfo_odd(self):
        self.assertEqual(info.parse_meminfo("MemTotal: 100 kB\nMemAvailable: 500 kB\n")["mem_used"], 0)
        self.assertEqual(info.parse_meminfo("MemTotal: 100 kB\n")["mem_used"], 0)

    def test_net_dev_skips_loopback_and_virtual(self):
        self.assertEqual(info.parse_net_dev(NET_DEV), (1000 + 500 + 6666, 2000 + 700 + 6666))
        self.assertEqual(info.parse_net_dev(NET_DEV, frozenset({"myvirt"})), (1500, 2700))

    def test_diskstats_whole_disks_only(self):
        self.assertEqual(info.parse_diskstats(DISKSTATS), ((1000 + 10 + 1) * 512, (2000 + 20 + 1) * 512))
        for name in ("sda", "vda", "nvme0n1", "mmcblk0", "xvdb", "hdc"):
            self.assertTrue(info.is_whole_disk(name), name)
        for name in ("sda1", "vda2", "nvme0n1p1", "mmcblk0p1", "loop0", "dm-1", "md127", "zram0", "ram0", "sr0", ""):
            self.assertFalse(info.is_whole_disk(name), name)

    def test_uptime(self):
        self.assertEqual(info.parse_uptime("86400.55 170000.12\n"), 86400)
        self.assertEqual(info.parse_uptime("7 1"), 7)

    def test_hostile_text_never_raises(self):
        for text in HOSTILE:
            self.assertIn(info.cpu_percent(info.parse_cpu(text), info.parse_cpu(STAT)), range(-1, 101))
            figures = info.parse_meminfo(text)
            self.assertTrue(all(0 <= value < 1 << 64 for value in figures.values()), text)
            for pair in (info.parse_net_dev(text), info.parse_diskstats(text)):
                self.assertTrue(all(0 <= value < 1 << 64 for value in pair), text)
            self.assertGreaterEqual(info.parse_uptime(text), 0)
        self.assertEqual(info.parse_uptime("-1.5 3"), 0)
        self.assertEqual(info.parse_uptime("1e9 0"), 0)
        self.assertEqual(info.parse_meminfo("MemTotal: 99999999999999999999999999 kB\n")["mem_total"], 0)

    def test_huge_counters_are_clamped(self):
        big = str((1 << 64) - 1)
        text = f"  eth0: {big} 0 0 0 0 0 0 0 {big} 0\n  eth1: {big} 0 0 0 0 0 0 0 5 0\n"
        self.assertEqual(info.parse_net_dev(text), ((1 << 64) - 1, (1 << 64) - 1))


class HostFiguresTests(unittest.TestCase):
    def test_cpu_since_last_call(self):
        files = {"/proc/stat": STAT, "/proc/meminfo": MEMINFO, "/proc/net/dev": NET_DEV,
                 "/proc/diskstats": DISKSTATS, "/proc/uptime": "42.0 1.0"}
        figures = info.HostFigures(read=lambda path: files.get(path, ""), virtual=lambda: frozenset({"myvirt"}))
        files["/proc/stat"] = STAT_LATER
        sample = figures.sample()
        self.assertEqual(sample["cpu"], 80)
        self.assertEqual(sample["sysup"], 42)
        self.assertEqual((sample["netrx"], sample["nettx"]), (1500, 2700))
        self.assertEqual(sample["mem_total"], 8000000 * 1024)
        self.assertEqual(figures.sample()["cpu"], -1)  # nothing moved since the last call

    def test_unreadable(self):
        figures = info.HostFigures(read=lambda path: "", virtual=frozenset)
        self.assertEqual(figures.sample(), {"cpu": -1, "mem_total": 0, "mem_used": 0, "swap_total": 0,
                                            "swap_used": 0, "netrx": 0, "nettx": 0, "diskr": 0, "diskw": 0,
                                            "sysup": 0})

    def test_real_proc(self):
        sample = info.HostFigures().sample()
        self.assertEqual(set(sample), {"cpu", "mem_total", "mem_used", "swap_total", "swap_used", "netrx",
                                       "nettx", "diskr", "diskw", "sysup"})
        if os.path.exists("/proc/meminfo"):
            self.assertGreater(sample["mem_total"], 0)
        os_name, arch = info.os_arch()
        self.assertTrue(os_name and arch)

    def test_read_is_bounded(self):
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"a" * (info.MAX_READ + 100))
        self.assertEqual(len(info.read_proc(path)), info.MAX_READ)
        self.assertEqual(info.read_proc(path + ".missing"), "")


class TargetTests(unittest.TestCase):
    def test_valid(self):
        for text, expected in (("127.0.0.1:80", ("127.0.0.1", 80)), ("[::1]:65535", ("::1", 65535)),
                               ("example.com:1", ("example.com", 1)), ("a-b.example.:443", ("a-b.example", 443))):
            self.assertEqual(parse_target(text), expected)

    def test_invalid(self):
        for text in ("", None, 5, "127.0.0.1", "127.0.0.1:0", "127.0.0.1:65536", "127.0.0.1:http", "::1:80",
                     "[127.0.0.1]:80", "[::1]80", "exa mple.com:80", "-bad-.com:80", "a" * 300 + ":80",
                     "host:+80", "host:٣", "1.2.3:80", "host:080000"):
            with self.assertRaises(ApiError) as caught:
                parse_target(text)
            self.assertEqual(caught.exception.status, 400, text)


class TCPingTests(unittest.TestCase):
    def test_listening_port(self):
        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        target = f"127.0.0.1:{port.getHost().port}"

        def check(result):
            self.assertEqual(result["target"], target)
            self.assertIs(result["connected"], True)
            self.assertIsInstance(result["latency"], int)
            self.assertGreaterEqual(result["latency"], 0)
            self.assertIsNone(result["error"])

        return TCPing(reactor).ping(target).addCallback(check)

    def test_closed_port(self):
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        target = f"127.0.0.1:{sock.getsockname()[1]}"
        sock.close()

        def check(result):
            self.assertEqual((result["connected"], result["latency"]), (False, 0))
            self.assertIn("refused", result["error"].lower())

        return TCPing(reactor).ping(target).addCallback(check)

    def test_deadline_and_cap(self):
        clock = MemoryReactorClock()  # connects never complete
        pinger = TCPing(clock)
        probes = [pinger.ping(f"127.0.0.1:{1000 + i}") for i in range(10)]
        failure = self.failureResultOf(pinger.ping("127.0.0.1:2000"), ApiError)
        self.assertEqual(failure.value.status, 429)
        self.assertEqual(len(clock.tcpClients), 10)
        clock.advance(4.9)
        self.assertNoResult(probes[0])
        clock.advance(0.2)
        result = self.successResultOf(probes[0])
        self.assertEqual(result["connected"], False)
        self.assertIn("timeout", result["error"])
        self.assertEqual(pinger.running, 0)
        self.assertNoResult(pinger.ping("127.0.0.1:3000"))  # room again

    def test_bad_target_costs_nothing(self):
        pinger = TCPing(MemoryReactorClock())
        self.assertEqual(self.failureResultOf(pinger.ping("nope"), ApiError).value.status, 400)
        self.assertEqual(pinger.running, 0)
