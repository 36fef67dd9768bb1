"""Generated protobuf and gRPC code (`make protos`); not committed."""
