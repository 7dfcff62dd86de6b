"""onnxruntime's speed on an fmnist ONNX model: the reference the planned executor is measured
against (make bench-kernels). Same images as fmnist-train bench-kernels (the committed sample,
cycled), same batch sizes, preprocessing (0-255 -> 0-1) included, at 1 and 2 intra-op threads.

usage: bench_onnxruntime.py MODEL [SAMPLE_CSV] [SECONDS]
"""
import sys
import time

import numpy as np
import onnxruntime as ort


def timed(seconds, min_calls, f):
    f()
    times = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        f()
        times.append(time.perf_counter() - t)
    return np.array(times)


def main():
    model = sys.argv[1]
    sample = sys.argv[2] if len(sys.argv) > 2 else "fixtures/sample.csv"
    seconds = float(sys.argv[3]) if len(sys.argv) > 3 else 3.0
    rows = np.loadtxt(sample, delimiter=",", skiprows=1, dtype=np.uint8)[:, 1:]
    print(f"\n[onnxruntime {ort.__version__}] {model} (preprocessing included)")
    for threads in (1, 2):
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        inp = sess.get_inputs()[0]
        shape = [d if isinstance(d, int) else -1 for d in inp.shape]

        def run(images):
            x = (images.astype(np.float32) / 255.0).reshape([len(images)] + shape[1:])
            sess.run(None, {inp.name: x})

        batch = rows[np.arange(64) % len(rows)]
        t64 = timed(seconds, 3, lambda: run(batch))
        one = rows[:1]
        t1 = timed(seconds, 20, lambda: run(one))
        print(
            f"  onnxruntime, {threads} thread{'s' if threads > 1 else ' '}  "
            f"batch 64: {64 * len(t64) / t64.sum():8.0f} img/s   "
            f"batch 1: p50 {np.percentile(t1, 50) * 1e6:7.1f} µs  p99 {np.percentile(t1, 99) * 1e6:7.1f} µs"
        )


if __name__ == "__main__":
    main()
