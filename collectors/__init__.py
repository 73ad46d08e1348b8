"""Evidence sources, one module per source. Each speaks the ``Collector`` protocol in ``collectors.base``."""
