"""Writes a backbone-only VGG16 safetensors file (torchvision names and shapes, random
He-uniform values, seed 0) for checking the VGG16 transfer export against onnxruntime in CI,
where no pretrained file can be downloaded. Written with numpy alone (the format is an 8-byte
header length, a JSON header, then the raw little-endian tensors).

usage: random_vgg16_backbone.py OUT.safetensors
"""
import json
import struct
import sys

import numpy as np

CONVS = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
WIDTHS = [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]


def main() -> int:
    rng = np.random.default_rng(0)
    tensors, c_in = {}, 3
    for idx, c_out in zip(CONVS, WIDTHS):
        bound = np.sqrt(6.0 / (c_in * 9))
        tensors[f"features.{idx}.weight"] = rng.uniform(-bound, bound, (c_out, c_in, 3, 3))
        tensors[f"features.{idx}.bias"] = rng.uniform(-0.01, 0.01, (c_out,))
        c_in = c_out
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        data = t.astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        blobs.append(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)
    with open(sys.argv[1], "wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for b in blobs:
            f.write(b)
    return 0


if __name__ == "__main__":
    sys.exit(main())
