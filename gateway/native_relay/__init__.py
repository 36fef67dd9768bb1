"""The native relay (``gateway.native_relay``, docs/design.md "The native relay"): a C++ process
(``native/relay``) this gateway process starts, which carries the messages of Execute calls while this
process keeps every decision.

    clients --Execute--> relay --Session--> our workers
                           |  control link (link.py): calls opened and closed, the workers' frames
                           |  reduced; Connect, Bind, the workers' messages, replies
                        this process: relay.py starts the relay (process.py) and the link, calls.py
                        runs each call through the request core; gateway.workers.relayed_session is
                        our worker connection with the relay holding its Session stream

A door, in the layers of the request's walk (tests/unit/test_layout.py): it may import the core, the
workers and the state, and nothing below imports it.

Envoy routes ``gateway.v1.Gateway/Execute`` to the relay and everything else here; it checks the relay's
health on this process's health service (``HEALTH_SERVICE``: SERVING while a relay is attached).
"""

HEALTH_SERVICE = "igw.native_relay"
