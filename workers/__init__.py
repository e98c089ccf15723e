"""Ray actors (decode + prune, batched LLM workers) and the service that wires them to Redis."""
