"""Clients of the service: tools that call it over HTTP and gRPC as its users do."""
