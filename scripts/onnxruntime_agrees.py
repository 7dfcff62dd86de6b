"""Checks that onnxruntime, an independent ONNX runtime, agrees with candle-onnx on a model
file written by fmnist: same argmax on every image and logits within 1e-4.

usage: onnxruntime_agrees.py MODEL.onnx DATA.csv CANDLE_LOGITS.json
"""
import json
import sys

import numpy as np
import onnxruntime as ort


def main() -> int:
    model, data, candle_json = sys.argv[1:4]
    rows = np.loadtxt(data, delimiter=",", skiprows=1, dtype=np.float32)
    pixels = rows[:, 1:] / np.float32(255.0)
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    shape = [len(pixels)] + [d for d in inp.shape[1:]]
    if shape[1:] == [1, 28, 28] or shape[1:] == [784]:
        x = pixels.reshape(shape)
    else:
        print(f"unsupported input shape {inp.shape}", file=sys.stderr)
        return 1
    ours = sess.run(None, {inp.name: x})[0]
    with open(candle_json) as f:
        theirs = np.asarray(json.load(f)["logits"], dtype=np.float32)
    passed = failed = 0
    agree = (ours.argmax(1) == theirs.argmax(1))
    close = np.abs(ours - theirs).max(axis=1) <= 1e-4
    for i in range(len(ours)):
        if agree[i] and close[i]:
            passed += 1
        else:
            failed += 1
            print(f"image {i}: onnxruntime {ours[i].argmax()} vs candle {theirs[i].argmax()}, "
                  f"max |diff| {np.abs(ours[i] - theirs[i]).max():.2e}")
    print(f"onnxruntime {ort.__version__} vs candle-onnx on {model}: "
          f"max |logit diff| {np.abs(ours - theirs).max():.2e}")
    print(f"onnxruntime: {passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
