"""Checks that onnxruntime, an independent ONNX runtime, agrees with fmnist's runtime (the
planned executor, or candle-onnx for graphs it does not plan; the logits come from
`fmnist-train eval`) on a model file written by fmnist: same argmax on every image and logits within 1e-4 (relative to the
logits' scale when that is above 1). 3-channel models get the same resize, done here in numpy.

usage: onnxruntime_agrees.py MODEL.onnx DATA.csv CANDLE_LOGITS.json
"""
import json
import sys

import numpy as np
import onnxruntime as ort


def resize_bilinear(planes, size):
    """PyTorch's interpolate(mode="bilinear", align_corners=False, antialias=False), written
    independently of fmnist's Rust code: source coordinate (o + 0.5) * in / out - 0.5, clamped
    at 0, upper neighbour clamped to the edge."""
    n, h, w = planes.shape

    def axis(inp, out):
        src = np.maximum((np.arange(out, dtype=np.float32) + 0.5) * (inp / out) - 0.5, 0)
        i0 = np.minimum(src.astype(np.int64), inp - 1)
        i1 = np.minimum(i0 + 1, inp - 1)
        return i0, i1, (src - i0).astype(np.float32)

    y0, y1, ly = axis(h, size)
    x0, x1, lx = axis(w, size)
    top = planes[:, y0][:, :, x0] * (1 - lx) + planes[:, y0][:, :, x1] * lx
    bottom = planes[:, y1][:, :, x0] * (1 - lx) + planes[:, y1][:, :, x1] * lx
    return top * (1 - ly[:, None]) + bottom * ly[:, None]


def main() -> int:
    model, data, candle_json = sys.argv[1:4]
    rows = np.loadtxt(data, delimiter=",", skiprows=1, dtype=np.float32)
    pixels = rows[:, 1:] / np.float32(255.0)
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [len(pixels)] + [d for d in inp.shape[1:]]
    if shape[1:] == [1, 28, 28] or shape[1:] == [784]:
        x = pixels.reshape(shape)
    elif shape[1] == 3 and shape[2] == shape[3]:
        # 3-channel models (VGG16 transfer): resize, then the gray plane on all three channels.
        planes = resize_bilinear(pixels.reshape(-1, 28, 28), shape[2])
        x = np.repeat(planes[:, None], 3, axis=1).astype(np.float32)
    else:
        print(f"unsupported input shape {inp.shape}", file=sys.stderr)
        return 1
    ours = sess.run(None, {inp.name: x})[0]
    with open(candle_json) as f:
        theirs = np.asarray(json.load(f)["logits"], dtype=np.float32)
    passed = failed = 0
    agree = (ours.argmax(1) == theirs.argmax(1))
    # 1e-4 absolute, or relative to the logits' scale when they are large (deep VGG models).
    tol = 1e-4 * max(1.0, float(np.abs(theirs).max()))
    close = np.abs(ours - theirs).max(axis=1) <= tol
    for i in range(len(ours)):
        if agree[i] and close[i]:
            passed += 1
        else:
            failed += 1
            print(f"image {i}: onnxruntime {ours[i].argmax()} vs fmnist {theirs[i].argmax()}, "
                  f"max |diff| {np.abs(ours[i] - theirs[i]).max():.2e}")
    print(f"onnxruntime {ort.__version__} vs fmnist on {model}: "
          f"max |logit diff| {np.abs(ours - theirs).max():.2e}")
    print(f"onnxruntime: {passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
