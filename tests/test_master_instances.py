# -*- test-case-name: tests.test_master_instances -*-
"""The master's instance record, sans-IO: URL checks and key generation,
the ``config`` URL, masking, NodePass's ``mode``, PATCH/meta validation
(hostile bodies), counters across runs and resets, the log buffer, rows
from the store, metrics samples."""

from __future__ import annotations

import re

from twisted.trial import unittest

from tunnelpass.config.options import parse_tunnel_url
from tunnelpass.master import instances as model
from tunnelpass.master.errors import ApiError
from tunnelpass.master.instances import Instance, check_meta, check_patch, check_url, config_url, mask_url

KEY = "9f3c1a7e5b2d8f4c6a0e1b9d7c3f5a28"
SERVER = f"server://{KEY}@127.0.0.1:10101/127.0.0.1:8080"
CLIENT = f"client://{KEY}@127.0.0.1:10101/127.0.0.1:8080?mode=2"

#: Query keys a config URL must carry for each type (every default).
SERVER_KEYS = ["log", "tls", "dns", "max", "mode", "type", "dial", "read", "rate", "slot", "proxy", "block",
               "notcp", "noudp", "lbs"]
CLIENT_KEYS = ["log", "dns", "min", "max", "mode", "dial", "read", "rate", "slot", "proxy", "block", "notcp",
               "noudp", "lbs"]


def make(url=SERVER, **kw) -> Instance:
    url, options = check_url(url)
    return Instance("0a1b2c3d", "one", url, options, "info", **kw)


def query_keys(url: str) -> list[str]:
    return [part.split("=")[0] for part in url.split("?", 1)[1].split("&")]


class UrlTests(unittest.TestCase):
    def test_keyless_server_gets_a_generated_key(self):
        url, options = check_url("server://127.0.0.1:10101/127.0.0.1:8080")
        self.assertRegex(options["key"], r"^[0-9a-f]{32}$")
        self.assertEqual(url, f"server://{options['key']}@127.0.0.1:10101/127.0.0.1:8080")
        other, _ = check_url("server://127.0.0.1:10101/127.0.0.1:8080")
        self.assertNotEqual(url, other)

    def test_keyless_server_can_keep_a_key(self):
        url, options = check_url("server://:10101/127.0.0.1:8080", keep_key=KEY)
        self.assertEqual(options["key"], KEY)
        self.assertTrue(url.startswith(f"server://{KEY}@:10101/"))

    def test_url_with_key_is_kept_as_given(self):
        self.assertEqual(check_url(SERVER)[0], SERVER)
        self.assertEqual(check_url(CLIENT)[0], CLIENT)

    def test_local_client_stays_keyless(self):
        url, options = check_url("client://127.0.0.1:10101/127.0.0.1:8080?mode=1")
        self.assertIsNone(options["key"])
        self.assertNotIn("@", url)

    def test_parser_message_is_the_error(self):
        for url in ("server://weakweakweakweak@127.0.0.1:1/127.0.0.1:2", "server://127.0.0.1:1/127.0.0.1:2?bogus=1",
                    "master://127.0.0.1:9090", "http://x:1/y:2", "server://127.0.0.1:99999/127.0.0.1:2",
                    "client://127.0.0.1:1/127.0.0.1:2?mode=2"):
            with self.assertRaises(ApiError) as caught:
                check_url(url)
            self.assertEqual(caught.exception.status, 400)
            try:
                parse_tunnel_url(url)
            except Exception as e:
                self.assertEqual(caught.exception.message, str(e))
            else:
                self.fail(f"{url} parsed")

    def test_hostile_url_values(self):
        for url, text in ((None, "url must be a string"), (5, "url must be a string"), (["a"], "url must be a string"),
                          ("", "url is required"), ("server://" + "a" * 2100, "longer than 2048")):
            with self.assertRaises(ApiError) as caught:
                check_url(url)
            self.assertIn(text, caught.exception.message)

    def test_config_fills_every_default(self):
        for url, keys in ((SERVER, SERVER_KEYS), (CLIENT, CLIENT_KEYS),
                          ("client://127.0.0.1:10101/127.0.0.1:8080?mode=1", CLIENT_KEYS)):
            url, options = check_url(url)
            config = config_url(url, options, "info")
            self.assertEqual(query_keys(config), keys)
            again = parse_tunnel_url(config)
            for name, value in options.items():
                expected = 0 if name in ("tls", "type") and value is None and options["mode"] == "server" else value
                self.assertEqual(again[name], expected, (url, name))

    def test_config_keeps_what_the_url_gives(self):
        url, options = check_url(f"server://{KEY}@:10101/127.0.0.1:8080?tls=1&mode=2&rate=1.25&read=90s&type=3"
                                 "&proxy=2&block=31&dns=0&weakkey=0&public=192.0.2.1:99&notcp=1")
        config = config_url(url, options, "info")
        again = parse_tunnel_url(config)
        for name, value in options.items():
            self.assertEqual(again[name], value, name)
        self.assertIn("public=192.0.2.1:99", config)
        self.assertIn("rate=1.25", config)

    def test_config_log_is_the_urls_else_the_masters(self):
        url, options = check_url(SERVER)
        self.assertIn("?log=warn&", config_url(url, options, "warn"))
        url, options = check_url(SERVER + "?log=debug")
        self.assertIn("?log=debug&", config_url(url, options, "warn"))

    def test_config_is_canonical(self):
        """Two spellings of one configuration give one config (PUT's 409)."""
        a = check_url(f"server://{KEY}@:10101/127.0.0.1:8080?tls=0&max=1024")
        b = check_url(f"server://{KEY}@0.0.0.0:10101/127.0.0.1:8080?max=1024&tls=0&mode=0")
        self.assertEqual(config_url(*a, "info"), config_url(*b, "info"))
        c = check_url(f"server://{KEY}@0.0.0.0:10101/127.0.0.1:8080?max=1000")
        self.assertNotEqual(config_url(*a, "info"), config_url(*c, "info"))

    def test_mode_is_nodepass_number(self):
        for url, mode in (("server://:1/127.0.0.1:2", 0), ("server://:1/127.0.0.1:2?mode=1", 1),
                          ("server://:1/127.0.0.1:2?mode=2", 2), (f"client://{KEY}@h.example:1/127.0.0.1:2", 0),
                          ("client://127.0.0.1:1/127.0.0.1:2?mode=1", 1),
                          (f"client://{KEY}@h.example:1/127.0.0.1:2?mode=2", 2)):
            instance = make(url)
            self.assertEqual(instance.mode, mode, url)
            self.assertEqual(instance.to_json(False)["mode"], mode)

    def test_mask(self):
        self.assertEqual(mask_url(SERVER), "server://********@127.0.0.1:10101/127.0.0.1:8080")
        self.assertEqual(mask_url("client://a%40b%3Acccccccccccccccc@[::1]:1/x:2?sni=u@v"),
                         "client://********@[::1]:1/x:2?sni=u@v")
        self.assertEqual(mask_url("client://127.0.0.1:1/x@y:2"), "client://127.0.0.1:1/x@y:2")
        self.assertEqual(mask_url("no scheme"), "no scheme")

    def test_views_mask_or_not(self):
        instance = make()
        masked, full = instance.to_json(True), instance.to_json(False)
        self.assertNotIn(KEY, str(masked))
        self.assertTrue(masked["url"].startswith("server://********@"))
        self.assertTrue(masked["config"].startswith("server://********@"))
        self.assertIn(KEY, full["url"])
        self.assertIn(KEY, full["config"])
        self.assertEqual(sorted(full), sorted(["id", "alias", "type", "status", "url", "config", "restart", "meta",
                                               "mode", "ping", "pool", "tcps", "udps", "tcprx", "tcptx", "udprx",
                                               "udptx"]))


class PatchTests(unittest.TestCase):
    def test_nulls_read_as_go_reads_them(self):
        """NodePassDash (Go structs with pointer fields) sends null for
        what it does not set: absent at the top, "" inside a peer or tag."""
        sid = "550e8400-e29b-41d4-a716-446655440000"
        self.assertEqual(check_patch({"alias": None, "action": None, "restart": False, "meta": None}),
                         {"restart": False})
        self.assertEqual(check_patch({"meta": {"peer": {"sid": sid, "type": "1", "alias": None}, "tags": None}}),
                         {"meta": {"peer": {"sid": sid, "type": "1", "alias": ""}, "tags": None}})
        self.assertEqual(check_patch({"meta": {"tags": {"env": None}}})["meta"]["tags"], {"env": ""})

    def refused(self, body, text):
        with self.assertRaises(ApiError) as caught:
            check_patch(body)
        self.assertEqual(caught.exception.status, 400)
        self.assertIn(text, caught.exception.message)

    def test_valid(self):
        body = {"alias": "x", "action": "reset", "restart": False,
                "meta": {"peer": {"sid": "550e8400-e29b-41d4-a716-446655440000", "type": "1", "alias": "p"},
                         "tags": {"env": "prod"}}}
        checked = check_patch(body)
        self.assertEqual(checked["meta"]["tags"], {"env": "prod"})
        self.assertEqual(checked["meta"]["peer"]["type"], "1")
        self.assertEqual(check_patch({}), {})
        self.assertEqual(check_patch({"alias": ""}), {"alias": ""})

    def test_empty_peer_keeps_and_absent_tags_keep(self):
        self.assertEqual(check_meta({"peer": {}, "tags": {"a": "b"}}), {"peer": None, "tags": {"a": "b"}})
        self.assertEqual(check_meta({"peer": {"alias": "p"}}),
                         {"peer": {"sid": "", "type": "", "alias": "p"}, "tags": None})
        self.assertEqual(check_meta({"tags": {}}), {"peer": None, "tags": {}})

    def test_wrong_types(self):
        for body, text in (([], "Invalid request body"), ("x", "Invalid request body"), (None, "Invalid request body"),
                           ({"alias": 5}, "alias must be a string"),
                           ({"action": 1}, "Invalid action: 1"), ({"action": ["start"]}, "Invalid action"),
                           ({"restart": "true"}, "restart must be true or false"), ({"restart": 1}, "restart must"),
                           ({"meta": []}, "meta must be an object"),
                           ({"meta": "x"}, "meta must be an object"), ({"meta": {"peer": []}}, "meta.peer must be"),
                           ({"meta": {"peer": {"sid": 5}}}, "meta.peer.sid must be a string"),
                           ({"meta": {"peer": {"type": 1}}}, "meta.peer.type must be a string"),
                           ({"meta": {"tags": []}}, "meta.tags must be an object"),
                           ({"meta": {"tags": {"a": 1}}}, "meta tag value must be a string")):
            self.refused(body, text)

    def test_oversized_and_unknown(self):
        long = "x" * 257
        for body, text in (({"alias": long}, "alias exceeds maximum length 256"),
                           ({"meta": {"peer": {"alias": long}}}, "meta.peer.alias exceeds"),
                           ({"meta": {"peer": {"sid": "a" * 37}}}, "meta.peer.sid must be a UUID"),
                           ({"meta": {"peer": {"sid": "550e8400 e29b"}}}, "meta.peer.sid must be a UUID"),
                           ({"meta": {"peer": {"type": "3"}}}, 'meta.peer.type must be "0", "1" or "2"'),
                           ({"meta": {"tags": {long: "v"}}}, "meta tag key exceeds"),
                           ({"meta": {"tags": {"k": long}}}, "meta tag value exceeds"),
                           ({"meta": {"tags": {"": "v"}}}, "meta tag key must not be empty"),
                           ({"meta": {"tags": {f"k{i}": "v" for i in range(65)}}}, "more than 64 tags"),
                           ({"meta": {"tags": {}, "extra": 1}}, "Unknown meta field: extra"),
                           ({"meta": {"peer": {"sid": "", "uid": "x"}}}, "Unknown meta.peer field: uid"),
                           ({"restrat": True}, "Unknown field: restrat"),
                           ({"action": "fly"}, "Invalid action: fly"),
                           ({"alias": "a\nb"}, "alias contains control characters"),
                           ({"meta": {"tags": {"k": "v\x00"}}}, "control characters")):
            self.refused(body, text)
        check_patch({"meta": {"tags": {f"k{i}": "v" * 256 for i in range(64)}}})


class CounterTests(unittest.TestCase):
    def test_total_is_base_plus_run(self):
        instance = make(counters={"tcprx": 1000})
        instance.apply_stats({"tcprx": 10, "tcptx": 20, "udprx": 3, "udptx": 4})
        self.assertEqual(instance.totals(), {"tcprx": 1010, "tcptx": 20, "udprx": 3, "udptx": 4})

    def test_runs_accumulate(self):
        instance = make()
        instance.new_run()
        instance.apply_stats({"tcprx": 100, "tcptx": 7})
        instance.fold()  # the run ended
        instance.new_run()
        instance.apply_stats({"tcprx": 30})
        self.assertEqual(instance.totals()["tcprx"], 130)
        self.assertEqual(instance.totals()["tcptx"], 7)

    def test_report_after_the_end_counts_only_new_bytes(self):
        instance = make()
        instance.new_run()
        instance.apply_stats({"tcprx": 100})
        instance.fold()  # declared failed (silent), the same run speaks again
        instance.apply_stats({"tcprx": 150})
        self.assertEqual(instance.totals()["tcprx"], 150)
        instance.fold()
        self.assertEqual(instance.totals()["tcprx"], 150)

    def test_reset_mid_run(self):
        instance = make(counters={"udptx": 5})
        instance.apply_stats({"tcprx": 100, "udptx": 9})
        instance.reset()
        self.assertEqual(instance.totals(), model.new_counters())
        instance.apply_stats({"tcprx": 140, "udptx": 9})
        self.assertEqual(instance.totals()["tcprx"], 40)
        self.assertEqual(instance.totals()["udptx"], 0)
        self.assertEqual(instance.to_row()["counters"]["tcprx"], 40)

    def test_hostile_stats_are_ignored(self):
        instance = make()
        instance.apply_stats({"tcprx": -1, "tcptx": "9", "udprx": True, "udptx": 1 << 70, "tcps": 2.5, "ping": 1.5,
                              "pool": None})
        self.assertEqual(instance.totals(), model.new_counters())
        self.assertEqual(instance.gauges, {"tcps": 0, "udps": 0, "pool": 0, "ping": 1})


class LogTests(unittest.TestCase):
    def test_lines_bounded(self):
        instance = make()
        for i in range(300):
            instance.add_log(f"line {i}")
        self.assertEqual(len(instance.logs), 200)
        self.assertEqual(instance.logs[0], "line 100")

    def test_bytes_bounded(self):
        instance = make()
        for i in range(100):
            instance.add_log(f"{i:04d}" + "é" * 2000)
        self.assertLessEqual(sum(len(line.encode()) for line in instance.logs), 64 * 1024)
        self.assertEqual(instance.log_bytes, sum(len(line.encode()) for line in instance.logs))
        self.assertTrue(instance.logs[-1].startswith("0099"))

    def test_long_line_cut(self):
        instance = make()
        kept = instance.add_log("x" * 70000)
        self.assertEqual(len(kept), model.MAX_LOG_LINE + 3)
        self.assertEqual(list(instance.logs), [kept])


class RowTests(unittest.TestCase):
    def test_round_trip(self):
        instance = make(restart=False, desired="stopped", counters={"tcprx": 5}, created=12.5,
                        meta={"peer": {"sid": "", "type": "2", "alias": "p"}, "tags": {"a": "b"}})
        row = instance.to_row()
        self.assertEqual(set(row), {"id", "alias", "url", "restart", "desired", "meta", "counters", "created"})
        again = Instance.from_row(row, "info")
        self.assertEqual(again.to_row(), row)
        self.assertEqual(again.to_json(False), instance.to_json(False))

    def test_hostile_row(self):
        row = {"id": "0a1b2c3d", "alias": None, "url": "server://127.0.0.1:1/nowhere", "restart": "yes",
               "desired": "sideways", "meta": {"peer": 5, "tags": {"k": 1}}, "counters": {"tcprx": -5, "tcptx": True,
                                                                                         "udprx": 7},
               "created": None}
        instance = Instance.from_row(row, "info")
        self.assertIsNone(instance.options)
        self.assertEqual(instance.type, "server")
        self.assertEqual(instance.config, row["url"])
        self.assertFalse(instance.restart)
        self.assertEqual(instance.desired, "stopped")
        self.assertEqual(instance.meta, model.empty_meta())
        self.assertEqual(instance.totals(), {"tcprx": 0, "tcptx": 0, "udprx": 7, "udptx": 0})


class ApiKeyEntryTests(unittest.TestCase):
    def test_shape(self):
        entry = model.api_key_entry("master", "0123456789abcdef")
        self.assertEqual((entry["id"], entry["url"], entry["config"], entry["alias"], entry["restart"]),
                         ("********", "********", "0123456789abcdef", "master", False))
        self.assertEqual(sorted(entry), sorted(make().to_json(False)))
        self.assertEqual(model.api_key_entry("m", "x", "newkey")["url"], "newkey")


class SampleTests(unittest.TestCase):
    def test_samples_and_escaping(self):
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.parser import text_string_to_metric_families

        from tunnelpass.ops.metrics import _Collector

        instance = make()
        instance.alias = 'we"ird\\alias {x="y"}'
        instance.status = "running"
        instance.apply_stats({"tcprx": 10, "tcptx": 20, "udprx": 30, "udptx": 40, "tcps": 2, "udps": 1, "pool": 8,
                              "ping": 12})
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(instance.samples))
        text = generate_latest(registry).decode()
        self.assertIn('alias="we\\"ird\\\\alias {x=\\"y\\"}"', text)
        seen = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.assertEqual(sample.labels["alias"], instance.alias)
                self.assertEqual(sample.labels["instance"], "0a1b2c3d")
                key = sample.name + "".join(f",{sample.labels.get(k)}" for k in ("protocol", "direction")
                                            if k in sample.labels)
                seen[key] = sample.value
        self.assertEqual(seen["tunnelpass_instance_up"], 1)
        self.assertEqual(seen["tunnelpass_instance_pool"], 8)
        self.assertEqual(seen["tunnelpass_instance_ping_seconds"], 0.012)
        self.assertEqual(seen["tunnelpass_instance_bytes_total,udp,tx"], 40)
        self.assertEqual(seen["tunnelpass_instance_bytes_total,tcp,rx"], 10)
        self.assertTrue(all(re.match(r"^tunnelpass_instance_", name) for name in seen))
