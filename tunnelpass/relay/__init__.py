"""Joins two streams: the accepted and dialled legs, how a leg ends, the copy,
splice and pump engines, rate limits, target groups and their probes, the
UDP forwarder's session tables, dialling (source address, name cache)."""
