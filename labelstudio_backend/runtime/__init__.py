"""What lives as long as the process: the runtime (model, feature cache, queues), named work queues, bounded containers, model loading with back-off, encode batching and per-project records."""
