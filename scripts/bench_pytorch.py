#!/usr/bin/env python3
"""PyTorch's training throughput on fmnist's exact CNN recipe, for BENCHMARKS.md.

The shipped recipe (train/src/models/cnn.rs): conv3x3(32, no bias) → batch-norm → ReLU →
maxpool2 → conv3x3(96, no bias) → batch-norm → ReLU → maxpool2 → fc(128) → ReLU →
dropout(0.1) → fc(10); cross-entropy, AdamW (weight decay 1e-4), batch 128, float32, CPU.
`--sizes 32 64 128 --no-bn` is the training issue's plain 2-conv CNN. `--net six` is the
6-conv network of the accuracy-per-minute issue (3 blocks × 2 × [conv3×3 + batch-norm + GELU],
32/64/128 channels, max-pool after the first two blocks, global average pool, fc 10);
`--net six-relu` is the same with ReLU, fmnist's default recipe since 2026-12-08.
`--bf16` runs forward and loss under `torch.autocast("cpu", dtype=torch.bfloat16)`, the one
line a PyTorch user adds on a CPU with AVX512_BF16 or AMX.
Each timed step is what `fmnist-train train` does per batch: forward, loss, backward,
optimiser step. Input is normalised in the model, as in fmnist's graph.

`--vgg SIZE` instead times VGG16 feature extraction as `fmnist-train bench-kernels` does
(inference, batch 8, input SIZE×SIZE: the 13 convolutions, pools and fc6/fc7; random weights,
since speed does not depend on them).

Usage: python3 scripts/bench_pytorch.py [--threads 2] [--seconds 10] [--batch 128] [--vgg 224]
Needs `pip install torch` (not installed by CI: this is a measurement, not a test).
"""
import argparse
import time
import warnings

import torch
import torch.nn as nn


def model(c1=32, c2=96, hidden=128, dropout=0.1, bn=True):
    norm = (lambda c: [nn.BatchNorm2d(c)]) if bn else (lambda c: [])
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1, bias=not bn),
        *norm(c1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1, bias=not bn),
        *norm(c2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * 49, hidden),
        nn.ReLU(),
        nn.Dropout(dropout),
        nn.Linear(hidden, 10),
    )


def six_conv(widths=(32, 64, 128), act=nn.GELU):
    layers, cin = [], 1
    for i, w in enumerate(widths):
        for _ in range(2):
            layers += [nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), act()]
            cin = w
        if i < len(widths) - 1:
            layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))


def vgg16_features(size):
    layers, cin = [], 3
    for v in [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, v, 3, padding=1), nn.ReLU()]
            cin = v
    side = size // 32
    return nn.Sequential(
        *layers,
        nn.AdaptiveAvgPool2d(7) if side != 7 else nn.Identity(),
        nn.Flatten(),
        nn.Linear(512 * 49, 4096),
        nn.ReLU(),
        nn.Linear(4096, 4096),
        nn.ReLU(),
    )


def bench_vgg(size, threads, seconds, batch=8):
    net = vgg16_features(size).eval()
    x = torch.rand(batch, 3, size, size)
    with torch.no_grad():
        net(x)
        steps, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds or steps < 2:
            net(x)
            steps += 1
    secs = time.perf_counter() - start
    print(
        f"pytorch {torch.__version__} CPU, {threads} threads, VGG16 features {size}x{size} "
        f"batch {batch}: {steps * batch / secs:.2f} img/s ({1e3 * secs / (steps * batch):.0f} ms/img)"
    )


def main():
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    ap.add_argument(
        "--no-bn",
        action="store_true",
        help="the issue's plain 2-conv CNN: biased convolutions, no batch-norm",
    )
    ap.add_argument("--sizes", type=int, nargs=3, default=[32, 96, 128], metavar=("C1", "C2", "H"))
    ap.add_argument("--net", choices=["cnn", "six", "six-relu"], default="cnn",
                    help="cnn: the 2-conv CNN; six: the issue's 6-conv GELU net; six-relu: with ReLU")
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for forward and loss")
    ap.add_argument("--vgg", type=int, metavar="SIZE", help="time VGG16 features instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.vgg:
        bench_vgg(args.vgg, args.threads, args.seconds)
        return
    torch.manual_seed(0)
    c1, c2, hidden = args.sizes
    if args.net == "six":
        net = six_conv()
    elif args.net == "six-relu":
        net = six_conv(act=nn.ReLU)
    else:
        net = model(c1, c2, hidden, bn=not args.no_bn)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    x = torch.rand(args.batch, 1, 28, 28).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (args.batch,))
    mean, std = 0.2860, 0.3530

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            loss = loss_fn(net((x - mean) / std), y)
        loss.backward()
        opt.step()

    for _ in range(5):
        step()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        step()
        steps += 1
    secs = time.perf_counter() - start
    name = {"six": "6-conv 32/64/128 BN+GELU", "six-relu": "6-conv 32/64/128 BN+ReLU"}.get(
        args.net, f"CNN {c1}-{c2}-{hidden}"
    )
    print(
        f"pytorch {torch.__version__} CPU, {args.threads} threads, {name}, batch {args.batch}"
        f"{' bf16 autocast' if args.bf16 else ' fp32'}"
        f"{' channels-last' if args.channels_last else ''}"
        f"{' no batch-norm' if args.no_bn else ''}: "
        f"{steps * args.batch / secs:.0f} img/s ({1e3 * secs / steps:.1f} ms/step)"
    )


if __name__ == "__main__":
    main()
