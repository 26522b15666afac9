"""The fleet controller (device registry, latency aggregation, staged rollouts): see the fleet issue."""
