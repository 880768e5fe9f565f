"""Tests for tunnelpass.tls: self-signed certificates, pins, pair loading."""

import os

from cryptography.hazmat.primitives import serialization
from twisted.trial import unittest

from tunnelpass.tls import (
    CertificateError,
    fingerprint,
    format_pin,
    load_pair,
    load_saved_pair,
    parse_pin,
    save_pair,
    self_signed,
)


class TLSHelperTests(unittest.TestCase):
    def test_self_signed_round_trip_and_fingerprint(self):
        key, cert = self_signed("tunnel.example")
        directory = self.mktemp()
        cert_path, key_path = save_pair(directory, key, cert)
        self.assertEqual(os.stat(key_path).st_mode & 0o777, 0o600)
        loaded_key, chain = load_pair(cert_path, key_path)
        self.assertEqual(fingerprint(chain[0]), fingerprint(cert))
        self.assertEqual(len(fingerprint(cert)), 32)

    def test_second_save_keeps_backup(self):
        directory = self.mktemp()
        first = self_signed()
        save_pair(directory, *first)
        second = self_signed()
        cert_path, key_path = save_pair(directory, *second)
        self.assertEqual(fingerprint(load_pair(cert_path, key_path)[1][0]), fingerprint(second[1]))
        self.assertEqual(fingerprint(load_pair(cert_path + ".bak", key_path + ".bak")[1][0]),
                         fingerprint(first[1]))

    def test_half_written_pair_falls_back_to_backup(self):
        directory = self.mktemp()
        first = self_signed()
        save_pair(directory, *first)
        save_pair(directory, *self_signed())
        # As if a crash hit between the key's rename and the certificate's:
        second_key, _ = self_signed()
        with open(os.path.join(directory, "tunnelpass.key"), "wb") as f:
            f.write(second_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
        _, chain = load_saved_pair(directory)
        self.assertEqual(fingerprint(chain[0]), fingerprint(first[1]))

    def test_no_temp_files_left(self):
        directory = self.mktemp()
        save_pair(directory, *self_signed())
        save_pair(directory, *self_signed())
        self.assertEqual(sorted(os.listdir(directory)),
                         ["tunnelpass.crt", "tunnelpass.crt.bak", "tunnelpass.key", "tunnelpass.key.bak"])

    def test_mismatched_pair_refused(self):
        directory = self.mktemp()
        cert_path, _ = save_pair(directory, *self_signed(), name="a")
        _, other_key = save_pair(directory, *self_signed(), name="b")
        with self.assertRaises(CertificateError) as cm:
            load_pair(cert_path, other_key)
        self.assertIn("is not the private key of", str(cm.exception))

    def test_garbage_files_refused(self):
        directory = self.mktemp()
        os.makedirs(directory)
        junk = os.path.join(directory, "junk.pem")
        with open(junk, "wb") as f:
            f.write(b"\x00not a pem\xff" * 100)
        cert_path, key_path = save_pair(directory, *self_signed())
        self.assertRaises(CertificateError, load_pair, junk, key_path)
        self.assertRaises(CertificateError, load_pair, cert_path, junk)
        self.assertRaises(CertificateError, load_pair, "/nonexistent.crt", key_path)

    def test_pins(self):
        digest = bytes(range(32))
        self.assertEqual(parse_pin(format_pin(digest)), digest)
        self.assertEqual(parse_pin("SHA256:" + ":".join(f"{b:02X}" for b in digest)), digest)
        for bad in ["", "sha1:abcd", "sha256:", "sha256:" + "z" * 64, "sha256:" + "ab" * 31, digest.hex()]:
            self.assertRaises(ValueError, parse_pin, bad)

    def test_key_is_p256(self):
        key, _ = self_signed()
        self.assertEqual(key.curve.name, "secp256r1")
        self.assertIn(b"BEGIN PRIVATE KEY", key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
