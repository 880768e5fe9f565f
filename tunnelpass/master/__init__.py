"""``--mode master``: a NodePass-compatible REST API that runs and supervises
many tunnel instances in worker processes, with durable state in SQLite."""
