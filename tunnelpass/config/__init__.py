"""Configuration: the frozen settings objects and their cross-option checks,
the command line and ``TUNNELPASS_*``/``NP_*`` variables, NodePass URLs,
tokens and keys, per-rule limits and the forwarder's rules file."""
