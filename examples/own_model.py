"""Your own model with deploytool's router: train with the penalty, export to ONNX, validate, serve locally.

    python examples/own_model.py [OUT_DIR]

deploytool.fit trains the module with the loop the built-in models use (temperature annealed 1 -> 0.02,
the routing losses added) and writes a run directory; the router in the middle of the network commits to
one expert per row at inference. The run's weights load into a module you build, the export is validated
against PyTorch right away, and deploytool.load runs it in ONNX Runtime.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import deploytool
from deploytool.data import load_digits
from deploytool.nn import RoutedExperts, Router, RoutingLoss


class MyModel(nn.Module):
    def __init__(self, n_experts: int = 4):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
        experts = [nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU()) for _ in range(n_experts)]
        self.routed = RoutedExperts(Router(32, n_experts), experts, loss=RoutingLoss(penalty="frank"))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        # the logits only: each Router's decisions are recorded by deploytool (and exported as outputs)
        return self.head(self.routed(self.embed(x)).output)


def main(out: Path) -> None:
    torch.manual_seed(0)
    data = load_digits(seed=0)
    run = deploytool.fit(MyModel(), (data.x_train, data.y_train), out=out / "run",
                         loop=deploytool.LoopSettings(epochs=60),
                         test_data=(data.x_test, data.y_test))
    m = run.metrics
    print(f"hard-routed test accuracy {m['hard_accuracy']:.3f} (soft {m['soft_accuracy']:.3f}), "
          f"{m['frac_confident']:.1%} confident")

    # deploytool cannot rebuild your class from the run dir: build it, then load the weights into it
    model = deploytool.load_weights_into(MyModel(), run.path)
    result = deploytool.export_onnx(model, out / "my_model.onnx", example_inputs=torch.from_numpy(data.x_test[:2]),
                                    data=data.x_test)
    print(f"exported {result.path}: validation {'passed' if result.passed else 'FAILED'}")
    session = deploytool.load(out / "my_model.onnx")
    outputs = session.run(data.x_test[:8])  # {name: array}: the logits and every router's index and probs
    print("experts chosen for 8 test rows:", outputs["routed.router.index"].tolist())


if __name__ == "__main__":
    if len(sys.argv) > 1:
        Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory(prefix="own-model-") as tmp:
            main(Path(tmp))
