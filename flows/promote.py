"""Move `champion` by hand, through the same gate and lock as training runs, and announce it with
the same Prefect event: python flows/promote.py NAME VERSION [--force]."""

from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Optional

from flows.cli import prepare_servers, user_errors_exit
from tasks.publish.promotion import promote_by_hand


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python flows/promote.py",
        description=(
            "Points `champion` of the registered model NAME at VERSION, and of NAME-onnx at the "
            "version the same MLflow run registered, through the champion gate (one move at a "
            "time, across machines when MLFLOW_TRACKING_URI is a server: then PREFECT_API_URL must "
            "name the team's Prefect server), and emits the image-classifier.model.promoted event. "
            "A version whose onnx_validated tag is not 'true' is always refused."
        ),
    )
    parser.add_argument("name", metavar="NAME", help="registered model name (the PyTorch flavor)")
    parser.add_argument("version", metavar="VERSION", help="version number of NAME")
    parser.add_argument(
        "--force",
        action="store_true",
        help=(
            "skip the checks that VERSION was trained on the champion's data (dataset_sha256) and "
            "is at least as accurate as the champion (test_accuracy); the ONNX check still applies"
        ),
    )
    return parser


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """NAME, VERSION and --force; --help and bad flags answer (status 2) before any work."""
    return build_parser().parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    """The command line's run: the servers are checked, the alias moved, what it did printed in one
    line; a refusal (or another user error) exits with `error: MESSAGE`."""
    with user_errors_exit():
        prepare_servers()
        outcome = promote_by_hand(args.name, args.version, force=args.force)
    moves = ", ".join(f"{name}@champion -> {version}" for name, version in outcome.versions.items())
    print(f"{moves} ({outcome.reason})")
    return asdict(outcome)


if __name__ == "__main__":
    main(parse_args())
