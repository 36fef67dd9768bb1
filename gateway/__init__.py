"""The gateway service: config, validation, worker pool, Execute servicer, server wiring."""
