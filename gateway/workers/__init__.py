"""The workers: the set (membership, health, drain), the connection interface, and one module per
worker protocol (our Session protocol; stock vLLM gRPC with the gateway's tokenizer)."""
