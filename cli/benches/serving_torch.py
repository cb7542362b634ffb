"""The serving bench's baseline: the same MLP in PyTorch behind a minimal Python HTTP server,
speaking the same Open Inference Protocol request and answer, one request per forward pass.

  serving_torch.py CHECKPOINT_DIR PORT

Loads `model.safetensors` (the weights as gantry exports them, in PyTorch's names and layout),
prints `listening PORT`, and serves POST /v2/models/NAME/infer until killed. PyTorch runs with
one intra-op thread (the bench pins the process to one core).
"""
import json
import socket
import struct
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import torch

torch.set_num_threads(1)


def read_safetensors(path):
    with open(path, "rb") as f:
        raw = f.read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__", None)
    data = raw[8 + n:]
    out = {}
    for name, t in header.items():
        start, end = t["data_offsets"]
        out[name] = torch.from_numpy(np.frombuffer(data[start:end], dtype="<f4").reshape(t["shape"]).copy())
    return out


def build(weights):
    # Linear layers in order (`NAME.weight` [out, in] and `NAME.bias`), ReLU between them.
    names = sorted({k.rsplit(".", 1)[0] for k in weights}, key=lambda n: [int(p) if p.isdigit() else p for p in n.replace("_", ".").split(".")])
    layers = []
    for i, name in enumerate(names):
        w = weights[name + ".weight"]
        lin = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.copy_(weights[name + ".bias"])
        layers.append(lin)
        if i < len(names) - 1:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers).eval()


MODEL = build(read_safetensors(sys.argv[1] + "/model.safetensors"))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def setup(self):
        super().setup()
        # As any server answering small requests does: otherwise Nagle's algorithm holds the
        # body back for the client's delayed ACK (40 ms) after the headers' write.
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        x = body["inputs"][0]
        rows = x["shape"][0]
        with torch.no_grad():
            probs = torch.softmax(MODEL(torch.tensor(x["data"], dtype=torch.float32).reshape(rows, -1)), dim=1)
        answer = json.dumps({"model_name": "torch", "outputs": [
            {"name": "probabilities", "datatype": "FP32", "shape": list(probs.shape), "data": probs.flatten().tolist()}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), Handler)
print(f"listening {server.server_address[1]}", flush=True)
server.serve_forever()
