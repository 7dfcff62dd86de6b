"""Prints the figures `make bench-train` reports from a trained model's JSON summary."""
import json
import sys

info = json.load(open(sys.argv[1]))
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
    for target in (0.90, 0.92, 0.93, 0.94):
        if acc is not None and acc >= target and target not in reached:
            reached[target] = elapsed
for target in (0.90, 0.92, 0.93, 0.94):
    t = reached.get(target)
    print(f"time to {target:.2f} test accuracy: " + (f"{t:.0f} s" if t is not None else "not reached"))
m = info.get("test_metrics") or {}
print(f"final test accuracy: {m.get('accuracy', float('nan')):.4f}")
