"""`check-config`: the effective configuration, or the systemd drop-in it needs."""

from __future__ import annotations

import argparse
import json
import sys

from contimg_publisher import unitnet
from contimg_publisher.cli.common import EXIT_FAILED, EXIT_OK
from contimg_publisher.config import Config


def config_text(cfg: Config) -> str:
    lines = [f"# {cfg.source}: valid"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in cfg.as_dict().items()
              if key != "source"]
    return "\n".join(lines)


def cmd_check_config(cfg: Config, args: argparse.Namespace) -> int:
    if args.unit_drop_in:
        try:
            text = unitnet.drop_in(cfg)
        except unitnet.DropInError as exc:
            print(f"contimg-publisher: check-config --unit-drop-in: {exc}; no drop-in printed",
                  file=sys.stderr)
            return EXIT_FAILED
        print(text, end="")
        return EXIT_OK
    print(config_text(cfg))
    return EXIT_OK
