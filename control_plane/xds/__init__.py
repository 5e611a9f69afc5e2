"""ADS: the sans-IO stream protocol and its grpc.aio server."""
