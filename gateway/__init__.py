"""The gateway service, in the order a request walks it.

- ``gateway.doors``: the front doors (gRPC ``Execute`` and its siblings, the OpenAI HTTP API, background
  jobs). A door translates its wire format into a ``RequestDraft`` and the core's events back.
- ``gateway.core``: authentication, the one validator, the request run (admit, reserve, queue, place,
  relay, settle), the scheduler and placement.
- ``gateway.workers``: the worker set and the connection to each worker, one module per protocol.
- ``gateway.state``: what outlives a request (quota, response cache, sessions, jobs), each a store and
  the feature on it.

``gateway.server`` wires them into a process; ``errors``, ``vocabulary``, ``metrics`` and ``observe``
are shared by all of them.
"""
