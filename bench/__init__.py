"""The throughput benchmark (issue 3): ``uv run python -m bench.run --help``."""
