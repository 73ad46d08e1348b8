from ollama_tracer.cli import entry

entry()
