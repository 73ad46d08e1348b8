"""Imported by Python at start-up when this directory is on PYTHONPATH (see tracer.autoinstrument)."""

import importlib.machinery
import importlib.util
import os
import sys

try:
    from ollama_tracer.autoinstrument import initialize

    initialize()
except Exception:  # the traced program must run even if tracer cannot
    print("tracer: auto-instrumentation unavailable in this interpreter", file=sys.stderr)

# Chain to the sitecustomize this one shadowed, if any, so we change nothing else.
_here = os.path.dirname(os.path.abspath(__file__))
_rest = [p for p in sys.path if os.path.abspath(p or ".") != _here]
_spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _rest)
if _spec is not None and _spec.loader is not None and _spec.origin != os.path.abspath(__file__):
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
