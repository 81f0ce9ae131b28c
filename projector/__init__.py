"""Consumer-group projections: events from the partition streams become denormalized
views in Redis hashes, each applied exactly once in effect, in per-aggregate order."""
