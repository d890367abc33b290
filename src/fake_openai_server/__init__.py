"""fake-openai-server."""
