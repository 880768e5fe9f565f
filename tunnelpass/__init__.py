"""tunnelpass: a secure, fast TCP/UDP tunnel and port forwarder on Twisted."""

__version__ = "0.1.0"
