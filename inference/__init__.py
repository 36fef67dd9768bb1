"""The inference worker: gRPC server around an engine adapter (vLLM or synthetic)."""
