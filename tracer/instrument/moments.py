"""How the client's moments (request written, first bytes, first token) travel.

By default as two child spans of the GenAI span (``client.request``, ``client.first_token``)
beside its attributes, for a backend that shows spans (``tracer run`` straight to Jaeger).
``tracer capture`` sets :data:`ENV_CLIENT_MOMENTS` to :data:`MOMENTS_AS_ATTRIBUTES`: the GenAI span
alone carries them, and the capture rebuilds the two spans when it reads its records back
(``collectors.otlp``), so the traced program exports one span per call instead of three
(``benchmarks/peers.py`` measures what each span costs it). No import here: the auto-instrumentation
reads this before it loads OpenTelemetry.
"""

ENV_CLIENT_MOMENTS = "TRACER_CLIENT_MOMENTS"
MOMENTS_AS_ATTRIBUTES = "attributes"
