"""Development tools, not runtime code: ``igw-stack`` (runs worker, gateway and Envoy on one machine)
and a synthetic stand-in for vLLM's gRPC server. Neither ships in an image; both import the other
packages like any installed user of them."""
