"""Density (coverage) stage: a mergeable RACE kernel-density sketch over embeddings and
inverse-density importance sampling, served over gRPC and as a Kafka stage."""
