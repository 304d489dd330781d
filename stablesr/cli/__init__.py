"""The ``stablesr`` command line: restore, convert, degrade, evaluate, fidelity-curve and ui.

This package is the only place that knows about argparse: each sub-command module has an ``add_*_parser`` and a
``cmd_*`` function that turns options into calls of the library (`stablesr.loading`, the pipeline, `stablesr.evaluate`,
...). The library never imports this package.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .common import CLIError

__all__ = ["CLIError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    from .convert import add_convert_parser
    from .degrade import add_degrade_parser
    from .evaluate import add_evaluate_parser
    from .fidelity_curve import add_fidelity_curve_parser
    from .models import add_models_parser
    from .restore import add_restore_parser
    from .ui import add_ui_parser

    parser = argparse.ArgumentParser(prog="stablesr", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)
    for add in (add_restore_parser, add_convert_parser, add_degrade_parser, add_evaluate_parser,
                add_fidelity_curve_parser, add_ui_parser, add_models_parser):
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from ..file_utils import DiskFullError

    try:
        return args.func(args)
    except (CLIError, DiskFullError, FileExistsError, FileNotFoundError, ValueError) as err:
        # User-fixable errors (library errors are ValueErrors that name the problem and the fix): no traceback.
        print(f"error: {err}", file=sys.stderr)
        return 2
