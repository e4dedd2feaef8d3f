"""Move `champion` by hand, through the same gate and lock as training runs, and announce it with
the same Prefect event: python flows/promote.py NAME VERSION [--force]."""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project's packages importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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


def main(argv: list[str] | None = None) -> dict:
    """Command-line entry point: moves the alias, prints what it did, returns the outcome."""
    args = build_parser().parse_args(argv)  # --help and bad flags answer before the imports below
    from flows.cli import exit_unless_prefect_answers, exit_unless_tracking_answers

    exit_unless_tracking_answers()
    exit_unless_prefect_answers()
    from tasks.publish.gate_lock import GateBusyError, GateMisconfiguredError, PrefectNotSharedError
    from tasks.publish.promotion import PromotionRefusedError, promote_by_hand

    refusals = (PromotionRefusedError, PrefectNotSharedError, GateMisconfiguredError, GateBusyError)
    try:
        outcome = promote_by_hand(args.name, args.version, force=args.force)
    except refusals as error:
        sys.exit(f"error: {error}")
    moves = ", ".join(f"{name}@champion -> {version}" for name, version in outcome.versions.items())
    print(f"{moves} ({outcome.reason})")
    return asdict(outcome)


if __name__ == "__main__":
    main()
