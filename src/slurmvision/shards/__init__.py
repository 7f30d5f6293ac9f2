"""WebDataset shards: build, verify, stats, stream."""
