"""One class per subcommand. The class docstring is the subcommand's ``--help`` text.

Adding a subcommand touches one new module here and one line in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
from typing import Protocol


class Command(Protocol):
    name: str

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...
