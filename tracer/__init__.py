"""ollama-tracer: where do the milliseconds of an Ollama request go?"""

__version__ = "0.1.0"
