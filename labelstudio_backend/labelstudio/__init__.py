"""Label Studio's formats: the labeling config, regions and their types, and helpers over payloads (ids, timestamps)."""
