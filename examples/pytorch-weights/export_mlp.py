"""Trains the digits MLP in PyTorch on seven of the ten digits (not 3, 5 and 8) and saves it for
gantry: `init_from: digits-mlp.safetensors`. finetune.yaml then learns 3, 5 and 8 from five
examples each on top of it, so no digit it is tested on was seen here.

The module's names and layout are gantry's (fc1: 64 -> 128, ReLU, fc2: 128 -> 10; weights as
nn.Linear keeps them, [out, in]), so the file loads as PyTorch wrote it. Run from this folder:

    python3 export_mlp.py        # needs torch, numpy and safetensors
"""
import os

import numpy as np
import torch
from safetensors.torch import save_file

rows = np.loadtxt("../../jobs/data/digits.csv", delimiter=",", dtype=np.float32)
rows = rows[~np.isin(rows[:, 64], [3, 5, 8])]
x = torch.from_numpy(rows[:, :64] / 16.0)  # pixels in 0..1, as gantry reads the digits
y = torch.from_numpy(rows[:, 64].astype(np.int64))


class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 128)
        self.fc2 = torch.nn.Linear(128, 10)

    def forward(self, v):
        return self.fc2(torch.relu(self.fc1(v)))


torch.manual_seed(0)
model = Mlp()
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
for epoch in range(5):
    for i in range(0, len(x), 64):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[i : i + 64]), y[i : i + 64]).backward()
        opt.step()
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, "digits-mlp.safetensors")
# save_file leaves the file readable by its owner only; gantry's jobs run as their own user.
os.chmod("digits-mlp.safetensors", 0o644)
print("saved digits-mlp.safetensors")
