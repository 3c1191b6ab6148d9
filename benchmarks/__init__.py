"""Throughput and latency harness (`make bench`, `conveyor bench`)."""
