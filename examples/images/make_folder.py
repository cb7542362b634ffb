"""Writes the digits gantry ships as an image folder, to try `dataset: {images: ...}` on:
digits-png/train/<digit>/<n>.png and digits-png/test/<digit>/<n>.png (every fifth image held
out), each 8x8 digit scaled up to 16x16 grey. Standard library only. Run from this folder:

    python3 make_folder.py
"""
import os
import struct
import zlib


def png(path, width, height, grey_rows):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + bytes(row) for row in grey_rows)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n")
        f.write(chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)))
        f.write(chunk(b"IDAT", zlib.compress(raw)))
        f.write(chunk(b"IEND", b""))


here = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(here, "../../jobs/data/digits.csv")) as f:
    rows = [list(map(int, line.split(","))) for line in f if line.strip()]
for i, row in enumerate(rows):
    pixels, digit = row[:64], row[64]
    split = "test" if i % 5 == 0 else "train"
    folder = os.path.join(here, "digits-png", split, str(digit))
    os.makedirs(folder, exist_ok=True)
    # 0..16 to 0..255, each pixel a 2x2 block.
    grey = [[pixels[(y // 2) * 8 + x // 2] * 255 // 16 for x in range(16)] for y in range(16)]
    png(os.path.join(folder, f"{i}.png"), 16, 16, grey)
print(f"wrote {len(rows)} images under {os.path.join(here, 'digits-png')}")
