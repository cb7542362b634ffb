"""Weights for gantry's digits MLP (fc1: 64 -> 128, fc2: 128 -> 10) made outside gantry, and the
logits they give on the rows of inputs.json, as PyTorch defines nn.Linear (y = x W^T + b).

With PyTorch installed: a model trained for a few steps in PyTorch on those rows, saved with
safetensors.torch. Without it: the same layout built with numpy and saved with
safetensors.numpy. Prints which one it used.

usage: make_weights.py INPUTS_JSON OUT_DIR
"""
import json
import sys

import numpy as np

inputs_path, out = sys.argv[1], sys.argv[2]
with open(inputs_path) as f:
    given = json.load(f)
x = np.array(given["x"], dtype=np.float32).reshape(-1, 64)
y = np.array(given["y"], dtype=np.int64)

try:
    import torch
    from safetensors.torch import save_file

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = torch.nn.Linear(64, 128)
            self.fc2 = torch.nn.Linear(128, 10)

        def forward(self, v):
            return self.fc2(torch.relu(self.fc1(v)))

    torch.manual_seed(0)
    net = Net()
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    for _ in range(30):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(xt), yt).backward()
        opt.step()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, f"{out}/weights.safetensors")
    with torch.no_grad():
        logits = net(xt).numpy()
    made_by = f"pytorch {torch.__version__}"
except ImportError:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    w = {
        "fc1.weight": rng.uniform(-0.125, 0.125, (128, 64)).astype(np.float32),
        "fc1.bias": rng.uniform(-0.125, 0.125, 128).astype(np.float32),
        "fc2.weight": rng.uniform(-0.088, 0.088, (10, 128)).astype(np.float32),
        "fc2.bias": rng.uniform(-0.088, 0.088, 10).astype(np.float32),
    }
    save_file(w, f"{out}/weights.safetensors")
    hidden = np.maximum(x @ w["fc1.weight"].T + w["fc1.bias"], 0)
    logits = hidden @ w["fc2.weight"].T + w["fc2.bias"]
    made_by = "numpy (PyTorch is not installed)"

with open(f"{out}/logits.json", "w") as f:
    json.dump({"logits": logits.astype(np.float64).ravel().tolist(), "made_by": made_by}, f)
print(made_by)
