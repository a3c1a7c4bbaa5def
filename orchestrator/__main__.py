"""`python -m orchestrator [--config FILE | --config-json JSON | --model PATH] [--port P]`."""
from __future__ import annotations

import argparse
import logging
import os
import sys

from orchestrator import config as cfg
from orchestrator.server import READY_LINE, run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m orchestrator")
    ap.add_argument("--config")
    ap.add_argument("--config-json")
    ap.add_argument("--model")
    ap.add_argument("--port", type=int, default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=os.environ.get("TANDEM_LOG", "WARNING"), stream=sys.stderr,
                        format="%(asctime)s orchestrator %(levelname)s %(message)s")
    if args.config_json:
        config = cfg.TandemConfig.model_validate_json(args.config_json)
    elif args.config:
        config = cfg.load(args.config)
    elif args.model:
        config = cfg.from_model(args.model)
    else:
        config = cfg.default_config()
    run(config, args.port, on_ready=lambda s: print(f"{READY_LINE} {s.address} {s.metrics.address}", flush=True))


if __name__ == "__main__":
    main()
