"""The operator command, `contimg-publisher SUBCOMMAND`: one module per group of commands,
each gathering what it shows apart from the text and JSON that show it.

Exit status: 0 done, 1 the operation failed, 2 bad usage or bad config.
"""

from contimg_publisher.cli.entry import main
from contimg_publisher.cli.parser import build_parser

__all__ = ["build_parser", "main"]
