"""twistd dropin: makes ``twistd tunnelpass`` available.

Kept to a few lines on purpose: twistd imports every dropin to list them, so
the real work (options, services) lives in :mod:`tunnelpass.tap`.
"""
from twisted.application.service import ServiceMaker

tunnelpass = ServiceMaker(
    "tunnelpass",
    "tunnelpass.tap",
    "Secure, fast TCP/UDP tunnel and port forwarder",
    "tunnelpass",
)
