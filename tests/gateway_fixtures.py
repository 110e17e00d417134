"""Session fixtures for a live gateway in front of the test vLLM server (owned by the gateway work)."""
