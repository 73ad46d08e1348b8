"""The local testbed: a real Ollama built from source, synthetic models, optionally Jaeger."""
