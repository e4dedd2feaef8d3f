"""Time to accuracy: the project's default training against two reference recipes, same files.

All three train on the 60,000/10,000 generated digits in FashionMNIST's file format
(`benchmarks/digits60k.py`) in one process, one after the other:
- project: the pipeline's default model and settings (TrainConfig's defaults: network, epochs,
  batch size, optimiser, schedule, precision, channels-last), its uint8 tensor loaders;
- notes: the notes' loop: their NeuralNetwork MLP (ReLU on the logits included), SGD lr 1e-3,
  batch 64, cross-entropy, a DataLoader over torchvision's FashionMNIST with ToTensor;
- examples: pytorch/examples' mnist recipe: its Net, Adadelta lr 1.0, StepLR(1, gamma 0.7),
  batch 64, ToTensor + Normalize((0.1307,), (0.3081,)) DataLoader.
Test accuracy is measured after every epoch with the clock stopped. Prints, per recipe, the
training seconds to reach --target and the accuracy reached within --budget seconds, and the
references' times over the project's, and writes that table to
benchmarks/results/time_to_accuracy.md.

    python benchmarks/time_to_accuracy.py [--data-dir data/benchmarks] [--target 0.97] [--budget 150]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402

from benchmarks.digits60k import write_digits60k  # noqa: E402
from benchmarks.results_file import Printed, write_result  # noqa: E402
from flows.config import TrainConfig  # noqa: E402
from flows.recipe import train_settings  # noqa: E402
from models import ModelSpec  # noqa: E402
from tasks.data.datasets import prepare_dataset  # noqa: E402
from tasks.data.loaders import make_loaders  # noqa: E402
from tasks.train import speed  # noqa: E402
from tasks.train.checkpoints import load_model, load_weights  # noqa: E402
from tasks.train.training import evaluate_loss, train  # noqa: E402

Epochs = Iterable[Callable[[], float]]  # each call trains one epoch, then returns test accuracy


class NotesNetwork(nn.Module):
    """The notes' NeuralNetwork, as written there."""

    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.linear_relu_stack = nn.Sequential(
            nn.Linear(28 * 28, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10), nn.ReLU()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_relu_stack(self.flatten(x))


class ExamplesNet(nn.Module):
    """pytorch/examples mnist/main.py's Net."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        x = self.dropout1(F.max_pool2d(x, 2))
        x = self.dropout2(F.relu(self.fc1(torch.flatten(x, 1))))
        return F.log_softmax(self.fc2(x), dim=1)


def dataloader_recipe(
    model: nn.Module, optimizer, scheduler, loss_fn, transform, data_dir: Path, batch_size: int = 64
) -> Epochs:
    """A classic torchvision-dataset DataLoader loop, one epoch per step of the iterator."""
    train_data = datasets.FashionMNIST(str(data_dir), train=True, transform=transform)
    test_data = datasets.FashionMNIST(str(data_dir), train=False, transform=transform)
    train_loader = DataLoader(train_data, batch_size=batch_size, shuffle=True)
    test_loader = DataLoader(test_data, batch_size=1000)

    def epoch() -> float:
        model.train()
        for images, labels in train_loader:
            optimizer.zero_grad()
            loss_fn(model(images), labels).backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        return _paused(lambda: _accuracy(model, test_loader))

    while True:
        yield epoch


_pause = [0.0]


def _paused(measure: Callable[[], float]) -> float:
    """Runs `measure` off the clock."""
    started = time.perf_counter()
    value = measure()
    _pause[0] += time.perf_counter() - started
    return value


@torch.no_grad()
def _accuracy(model: nn.Module, loader) -> float:
    model.eval()
    correct = total = 0
    for images, labels in loader:
        correct += int((model(images).argmax(1) == labels).sum())
        total += len(labels)
    return correct / total


def notes_recipe(data_dir: Path) -> Epochs:
    torch.manual_seed(0)
    model = NotesNetwork()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    return dataloader_recipe(model, optimizer, None, nn.CrossEntropyLoss(), transforms.ToTensor(), data_dir)


def examples_recipe(data_dir: Path) -> Epochs:
    torch.manual_seed(0)
    model = ExamplesNet()
    optimizer = torch.optim.Adadelta(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.7)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    return dataloader_recipe(model, optimizer, scheduler, F.nll_loss, transform, data_dir)


def project_curve(data_dir: Path, scratch: Path) -> list[tuple[float, float]]:
    """The pipeline's own train() with TrainConfig's defaults; after each epoch the checkpoint it
    just wrote is tested off the clock. Returns (training seconds, test accuracy) per epoch."""
    config = TrainConfig(dataset="fashion-mnist", data_dir=str(data_dir))
    dataset = prepare_dataset(config.dataset, data_dir)
    loaders = make_loaders(dataset, config.batch_size, config.val_fraction, config.seed, "cpu")
    spec = ModelSpec(config.model, 1, (28, 28), 10, dataset.mean, dataset.std)
    checkpoint = scratch / "last.pt"
    checkpoint.unlink(missing_ok=True)
    curve: list[tuple[float, float]] = []
    started = time.perf_counter()

    def test_accuracy() -> float:
        return evaluate_loss(load_model(spec, load_weights(checkpoint)["model"]), loaders.test)["accuracy"]

    def on_epoch(epoch: int, metrics: dict) -> None:
        seconds = time.perf_counter() - started - _pause[0]
        curve.append((seconds, _paused(test_accuracy)))
        print(f"  project  epoch {epoch}: {seconds:6.1f} s  test accuracy {curve[-1][1]:.4f}", flush=True)

    _pause[0] = 0.0
    train(spec, loaders, train_settings(config), checkpoint, on_epoch)
    return curve


def run(name: str, epochs: Epochs, target: float, budget: float) -> dict:
    """Trains epoch by epoch until `budget` training seconds are spent."""
    _pause[0] = 0.0
    started = time.perf_counter()
    curve = []
    for epoch in epochs:
        accuracy = epoch()
        curve.append((time.perf_counter() - started - _pause[0], accuracy))
        print(
            f"  {name:8s} epoch {len(curve)}: {curve[-1][0]:6.1f} s  test accuracy {accuracy:.4f}", flush=True
        )
        if curve[-1][0] >= budget:
            break
    return summarise(curve, target, budget)


def summarise(curve: list[tuple[float, float]], target: float, budget: float) -> dict:
    reached = next((seconds for seconds, accuracy in curve if accuracy >= target), None)
    within = [accuracy for seconds, accuracy in curve if seconds <= budget]
    return {"to_target": reached, "in_budget": max(within, default=0.0), "epochs": len(curve)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=REPO / "data" / "benchmarks")
    parser.add_argument("--target", type=float, default=0.97)
    parser.add_argument("--budget", type=float, default=150.0, help="training seconds per reference")
    args = parser.parse_args()
    write_digits60k(args.data_dir)
    speed.set_threads(None)
    print(f"threads={torch.get_num_threads()} target={args.target} budget={args.budget:.0f} s")

    curve = project_curve(args.data_dir, args.data_dir / "time_to_accuracy")
    results = {"project": summarise(curve, args.target, args.budget)}
    results["examples"] = run("examples", examples_recipe(args.data_dir), args.target, args.budget)
    results["notes"] = run("notes", notes_recipe(args.data_dir), args.target, args.budget)

    mine = results["project"]["to_target"]
    out = Printed()
    out(f"threads={torch.get_num_threads()} target={args.target} budget={args.budget:.0f} s")
    out(f"{'recipe':9s} {'s to target':>12s} {'acc in budget':>14s} {'time ratio':>11s}")
    for name, result in results.items():
        seconds = result["to_target"]
        shown = f"{seconds:.1f}" if seconds is not None else f"> {args.budget:.0f}"
        if seconds is None:
            ratio = f"> {args.budget / mine:.1f}x" if mine else "n/a"
        else:
            ratio = f"{seconds / mine:.2f}x" if mine else "n/a"
        out(f"{name:9s} {shown:>12s} {result['in_budget']:14.4f} {ratio:>11s}")
    write_result(
        "time_to_accuracy", "Time to accuracy: the default training against two recipes", out.block()
    )


if __name__ == "__main__":
    main()
