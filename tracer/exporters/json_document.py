"""Any JSON document of ours (a diff, a benchmark's result) as indented JSON."""

from __future__ import annotations

import json
from typing import Any, TextIO


def render(outfile: TextIO, document: dict[str, Any]) -> None:
    json.dump(document, outfile, indent=2)
    outfile.write("\n")
