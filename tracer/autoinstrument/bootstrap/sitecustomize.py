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

# Chain to the sitecustomize this one shadowed, if any, so we change nothing else: it runs as
# `sitecustomize` (its __name__, and sys.modules, so the program's `import sitecustomize` gets it),
# exactly as the import system would have run it. Its own errors are its own: they reach site.py,
# which prints them and goes on, as without us.
_here = os.path.dirname(os.path.abspath(__file__))
try:
    _rest = [p for p in sys.path if os.path.abspath(p or ".") != _here]
    _spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _rest)
except Exception:  # a path entry we cannot search must not stop the program
    _spec = None
if _spec is not None and _spec.loader is not None and _spec.origin != os.path.abspath(__file__):
    _ours = sys.modules.get("sitecustomize")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["sitecustomize"] = _module
    try:
        _spec.loader.exec_module(_module)
    except BaseException:
        # Like a failed import: it leaves no half-run module behind.
        if sys.modules.get("sitecustomize") is _module:
            if _ours is None:
                del sys.modules["sitecustomize"]
            else:
                sys.modules["sitecustomize"] = _ours
        raise
