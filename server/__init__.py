"""paramserve.server: the parameter-server daemon (store, aggregation, snapshots, gRPC, CLI)."""
