"""conveyor beside its peers, pgqueuer and graphile-worker (`make bench-peers`)."""
