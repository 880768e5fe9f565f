"""The stream interface (:mod:`tunnelpass.carriers.stream`) and the carriers
that implement it: a plain TCP connection, TLS on the socket (C-speed) or
on Twisted's memory BIO, protocol hand-over, keep-alive, and the idle pool
with its stream opener."""
