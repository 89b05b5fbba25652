"""Command-line tools around the model: identity with the official outputs, benchmarks, the GPU check and the precision check."""
