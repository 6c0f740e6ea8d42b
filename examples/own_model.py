"""Your own model with deploytool's router: train with the penalty, export to ONNX, validate, serve locally.

    python examples/own_model.py [OUT_DIR]

The router in the middle of the network commits to one expert per row at inference; the export is
validated against PyTorch right away, and deploytool.load runs it in ONNX Runtime.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

import deploytool
from deploytool.data import load_digits
from deploytool.nn import RoutedExperts, Router, RoutingLoss, collect_routing_loss, set_temperature


class MyModel(nn.Module):
    def __init__(self, n_experts: int = 4):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(64, 32), nn.ReLU())
        experts = [nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU()) for _ in range(n_experts)]
        self.routed = RoutedExperts(Router(32, n_experts), experts, loss=RoutingLoss(penalty="frank"))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        routed = self.routed(self.embed(x))
        return self.head(routed.output), routed.index, routed.probs


def main(out: Path) -> None:
    torch.manual_seed(0)
    data = load_digits(seed=0)
    x, y = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    model = MyModel()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    epochs = 60
    for epoch in range(epochs):
        set_temperature(model, 1.0 * (0.02 / 1.0) ** (epoch / (epochs - 1)))  # anneal 1 -> 0.02
        model.train()
        for idx in torch.randperm(len(x)).split(64):
            logits, _, _ = model(x[idx])
            loss = nn.functional.cross_entropy(logits, y[idx]) + collect_routing_loss(model)
            opt.zero_grad()
            loss.backward()
            opt.step()

    model.eval()
    with torch.no_grad():
        logits, index, probs = model(torch.from_numpy(data.x_test))
    hard_acc = (logits.argmax(1).numpy() == data.y_test).mean()
    print(f"hard-routed test accuracy {hard_acc:.3f}, {(probs.max(1).values >= 0.99).float().mean():.1%} confident")

    result = deploytool.export_onnx(model, out / "my_model.onnx", data=data.x_test)
    print(f"exported {result.path}: validation {'passed' if result.passed else 'FAILED'}")
    session = deploytool.load(out / "my_model.onnx")
    routed = session.run(data.x_test[:8])
    print("experts chosen for 8 test rows:", routed.index.tolist())


if __name__ == "__main__":
    if len(sys.argv) > 1:
        Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
        main(Path(sys.argv[1]))
    else:
        with tempfile.TemporaryDirectory(prefix="own-model-") as tmp:
            main(Path(tmp))
