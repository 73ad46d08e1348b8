"""Client-side OpenTelemetry instrumentation for Ollama clients (the SDK and ``requests``)."""
