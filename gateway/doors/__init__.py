"""The front doors: each turns its wire format into a ``RequestDraft`` and maps the core's events and
errors back to its own wire format. No door decides anything the core decides."""
