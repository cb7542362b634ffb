"""The PyTorch side of `cargo bench --bench training`: the same models as gantry's runtime, the
same data set and sample counts, the same batch size and optimizer (Adam, PyTorch's defaults),
timed the same way (the training loop of each epoch, evaluation excluded).

Usage: pytorch_reference.py MODEL EPOCHS BATCH_SIZE REPO_ROOT [DEVICE [PRECISION]]
DEVICE is cpu (the default) or cuda, with PyTorch's default precision settings. PRECISION is
f32 (the default) or bf16: the forward pass and loss under torch.autocast(bfloat16), as
gantry's `precision: bf16` (f32 weights and optimizer).
Prints one JSON object: samples/s of each epoch, and torch's thread count.
"""
import contextlib
import json
import sys
import time

import torch
from torch import nn

model_name, epochs, batch_size, root = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
device = torch.device(sys.argv[5] if len(sys.argv) > 5 else "cpu")
precision = sys.argv[6] if len(sys.argv) > 6 else "f32"
if precision not in ("f32", "bf16"):
    sys.exit(f"unknown precision {precision}: expected f32 or bf16")
torch.manual_seed(42)
# The transformers: (layers, width, heads, context), as gantry's model of the same name.
TRANSFORMERS = {"transformer": (2, 64, 4, 64), "transformer-4x256": (4, 256, 4, 128)}


def digits():
    rows = [list(map(float, l.split(","))) for l in open(f"{root}/jobs/data/digits.csv") if l.strip()]
    rows = rows[:1437]  # as many training samples as gantry's 80% split
    x = torch.tensor([r[:64] for r in rows]) / 16.0
    y = torch.tensor([int(r[64]) for r in rows])
    return x, y


def genesis(context):
    lines = open(f"{root}/jobs/data/genesis.txt").read().splitlines(keepends=True)
    text = "".join(lines[: len(lines) - len(lines) * 10 // 100])
    tokens = torch.tensor([0 if c == "\n" else ord(c) - 31 for c in text])
    n = (len(tokens) - 1) // context
    x = torch.stack([tokens[i * context : i * context + context] for i in range(n)])
    y = torch.stack([tokens[i * context + 1 : i * context + context + 1] for i in range(n)])
    return x, y


class Lm(nn.Module):
    def __init__(self, layers, width, heads, context):
        super().__init__()
        self.tokens = nn.Embedding(96, width)
        self.positions = nn.Embedding(context, width)
        layer = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, 96)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(context))

    def forward(self, x):
        h = self.tokens(x) + self.positions(torch.arange(x.shape[1], device=x.device))
        h = self.blocks(h, mask=self.mask, is_causal=True)
        return self.head(self.norm(h)).reshape(-1, 96)


if model_name == "mlp":
    x, y = digits()
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10))
elif model_name == "cnn":
    x, y = digits()
    x = x.reshape(-1, 1, 8, 8)
    model = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(128, 10),
    )
else:
    layers, width, heads, context = TRANSFORMERS[model_name]
    x, y = genesis(context)
    model = Lm(layers, width, heads, context)

model, x, y = model.to(device), x.to(device), y.to(device)
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
loss_fn = nn.CrossEntropyLoss()
rates = []
autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if precision == "bf16" else contextlib.nullcontext
for epoch in range(epochs):
    order = torch.randperm(len(x), device=device)
    started = time.perf_counter()
    for first in range(0, len(x), batch_size):
        batch = order[first : first + batch_size]
        with autocast():
            loss = loss_fn(model(x[batch]), y[batch].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        loss.item()  # as the runtime reads each step's loss
    rates.append(len(x) / (time.perf_counter() - started))
print(json.dumps({"samples_per_s": rates, "threads": torch.get_num_threads(), "torch": torch.__version__}))
