"""The static forwarder: one listener per rule of the rules file, reloaded
by diff (:mod:`tunnelpass.forward.service`)."""
