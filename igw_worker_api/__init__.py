"""The worker protocol's generated code (``protos/igw_worker_api/v1/worker.proto``, proto package
``inference.v1``): the one place the gateway and the worker meet, imported by both without either
importing the other."""
