"""A client of gantry's Open Inference Protocol endpoint, as a user would write one.

  client.py accuracy URL MODEL ROWS.json OUT.json   classify every row, in batches, and write
                                                     {"accuracy": ..., "predictions": [...]}
  client.py load URL MODEL STOP_FILE OUT.json N      N threads each sending one-example requests
                                                     until STOP_FILE exists; writes the count of
                                                     each status code and of connection errors

TOKEN and CA (a CA certificate file, for https) come from the environment.
"""
import http.client
import json
import os
import ssl
import sys
import threading
import urllib.parse


def connection(url):
    u = urllib.parse.urlparse(url)
    if u.scheme == "https":
        ctx = ssl.create_default_context(cafile=os.environ.get("CA"))
        return http.client.HTTPSConnection(u.hostname, u.port, context=ctx, timeout=30)
    return http.client.HTTPConnection(u.hostname, u.port, timeout=30)


def infer(conn, model, rows):
    body = {"inputs": [{"name": "pixels", "shape": [len(rows), len(rows[0])], "datatype": "FP32",
                        "data": [x for row in rows for x in row]}]}
    headers = {"Content-Type": "application/json"}
    if os.environ.get("TOKEN"):
        headers["Authorization"] = "Bearer " + os.environ["TOKEN"]
    conn.request("POST", f"/v2/models/{urllib.parse.quote(model)}/infer", json.dumps(body), headers)
    response = conn.getresponse()
    return response.status, response.read()


def accuracy(url, model, rows_file, out_file):
    data = json.load(open(rows_file))
    rows, labels = data["rows"], data["labels"]
    conn = connection(url)
    predictions = []
    for i in range(0, len(rows), 16):
        status, body = infer(conn, model, rows[i:i + 16])
        if status != 200:
            sys.exit(f"HTTP {status}: {body.decode()}")
        out = json.loads(body)["outputs"][0]
        classes = out["shape"][1]
        probs = out["data"]
        for r in range(out["shape"][0]):
            p = probs[r * classes:(r + 1) * classes]
            predictions.append(max(range(classes), key=lambda c: p[c]))
    right = sum(1 for p, y in zip(predictions, labels) if p == y)
    json.dump({"accuracy": right / len(labels), "right": right, "total": len(labels),
               "predictions": predictions}, open(out_file, "w"))


def load(url, model, stop_file, out_file, threads):
    counts = {}
    lock = threading.Lock()
    row = [0.5] * 64

    def worker():
        conn = connection(url)
        while not os.path.exists(stop_file):
            try:
                status, _ = infer(conn, model, [row])
                key = str(status)
            except Exception as e:  # a refused or broken connection: counted, never hidden
                key = "error: " + type(e).__name__
                conn = connection(url)
            with lock:
                counts[key] = counts.get(key, 0) + 1

    ts = [threading.Thread(target=worker) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    json.dump(counts, open(out_file, "w"))


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "accuracy":
        accuracy(*sys.argv[2:6])
    elif mode == "load":
        load(*sys.argv[2:6], int(sys.argv[6]))
    else:
        sys.exit(f"unknown mode {mode}")
