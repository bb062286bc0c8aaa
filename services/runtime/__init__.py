"""The one shared runtime: domain model, settings, codec, Kafka stage loop, metrics,
gRPC server lifecycle, error mapping and model backends. Every service builds on it."""
