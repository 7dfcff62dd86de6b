"""Prints the figures `make bench-train` reports from a trained model's JSON summary."""
import json
import sys

TARGETS = (0.90, 0.92, 0.93, 0.94, 0.945, 0.95)


def cpu():
    """The CPU model and the features that choose fmnist's kernel paths (speed figures hold
    only for the CPU they were measured on)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown CPU"
    model = next((l.split(":", 1)[1].strip() for l in text.splitlines() if l.startswith("model name")), "?")
    flags = next((l.split(":", 1)[1].split() for l in text.splitlines() if l.startswith("flags")), [])
    wanted = ["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"]
    return f"{model}; {' '.join(f for f in wanted if f in flags) or 'no AVX-512'}"


info = json.load(open(sys.argv[1]))
print(f"CPU: {cpu()}; CPU path: {info.get('cpu_path', 'not recorded')}")
epochs = info["epochs"]
imgs = sum(e["images_per_second"] * e["seconds"] for e in epochs)
secs = sum(e["seconds"] for e in epochs)
print(f"training throughput: {imgs / secs:.0f} img/s over {len(epochs)} epochs "
      f"({secs:.0f} s of training steps, {info['wall_seconds']:.0f} s wall incl. data and export)")
elapsed = 0.0
reached = {}
for e in epochs:
    elapsed += e["seconds"]
    acc = e.get("test_accuracy")
    print(f"  epoch {e['epoch']:>2}: {e['images_per_second']:.0f} img/s, "
          f"val acc {e['val_accuracy'] or 0:.4f}, test acc {acc or 0:.4f}, at {elapsed:.0f} s")
    for target in TARGETS:
        if acc is not None and acc >= target and target not in reached:
            reached[target] = elapsed
for target in TARGETS:
    t = reached.get(target)
    print(f"time to {target:.3f} test accuracy: " + (f"{t:.0f} s" if t is not None else "not reached"))
m = info.get("test_metrics") or {}
print(f"final test accuracy: {m.get('accuracy', float('nan')):.4f}")
