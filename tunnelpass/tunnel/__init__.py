"""The server and client ends of a tunnel over a carrier: the gate and
admission guard, the control channel, pool policy and dialling, the OPEN
dispatcher, TLS levels, session life, and UDP sessions through the tunnel."""
