"""Real third-party Open Inference Protocol clients against a live fmnist-serve.

tritonclient (HTTP with its default binary tensors, HTTP with JSON tensors, gRPC) and kserve
(InferenceRESTClient with protocol v2, InferenceGRPCClient), each used as its documentation
shows, must give the predictions `fmnist-train eval` gave on the fixture images, and answer
health, metadata, configuration and classification calls.

usage: oip_clients.py triton|kserve HTTP_ADDR GRPC_ADDR MODEL_NAME DATA.csv EVAL_LOGITS.json
The credentials come from FMNIST_TEST_USER / FMNIST_TEST_PASSWORD (never the command line).
Prints one line per check and "N passed, N failed" at the end; exits 1 on any failure.

The two client families run in separate processes: both register the protocol's messages
(`inference.ServerLiveRequest`, ...) in protobuf's one default descriptor pool, and the second
import fails with "duplicate symbol".
"""
import asyncio
import base64
import json
import os
import sys
import traceback

import numpy as np

BATCH = 64
results = {"passed": 0, "failed": 0}


def check(name, fn):
    try:
        detail = fn()
        results["passed"] += 1
        print(f"ok    {name}{': ' + detail if detail else ''}")
    except Exception as e:  # a failed check is reported, and the others still run
        results["failed"] += 1
        print(f"FAIL  {name}: {type(e).__name__}: {e}")
        traceback.print_exc(limit=3)


def batches(pixels):
    for start in range(0, len(pixels), BATCH):
        yield start, pixels[start:start + BATCH]


def same_predictions(logits, expected, start, what):
    got = logits.argmax(axis=1)
    want = expected[start:start + len(logits)].argmax(axis=1)
    if not np.array_equal(got, want):
        bad = int(np.flatnonzero(got != want)[0])
        raise AssertionError(f"{what}: image {start + bad} predicted {got[bad]}, eval says {want[bad]}")
    diff = float(np.abs(logits - expected[start:start + len(logits)]).max())
    if diff > 1e-4:
        raise AssertionError(f"{what}: logits differ from eval's by {diff:.2e}")
    return diff


def top1_index(strings):
    """Triton's classification strings "score:index:label" -> index of each row's first."""
    def text(v):  # binary BYTES come back as bytes, JSON ones as str
        return v.decode() if isinstance(v, bytes) else v
    return np.array([int(text(row[0]).split(":")[1]) for row in strings])


CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot"]


def triton(http_addr, grpc_addr, model, user, password, pixels, expected):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient
    from tritonclient.grpc.auth import BasicAuth as GrpcBasicAuth
    from tritonclient.http.auth import BasicAuth as HttpBasicAuth
    from tritonclient.utils import InferenceServerException

    n = len(pixels)
    # ---- tritonclient.http -------------------------------------------------------------
    h = httpclient.InferenceServerClient(http_addr)
    h.register_plugin(HttpBasicAuth(user, password))
    meta = {}

    def health():
        assert h.is_server_live() and h.is_server_ready() and h.is_model_ready(model)
        assert h.is_model_ready(model, model_version="1")
        assert not h.is_model_ready(model, model_version="2")
        ext = h.get_server_metadata()["extensions"]
        for e in ("binary_tensor_data", "model_configuration", "classification"):
            assert e in ext, ext
        meta.update(h.get_model_metadata(model))
        assert meta["name"] == model and meta["versions"] == ["1"], meta
        cfg = h.get_model_config(model)
        assert cfg["name"] == model and cfg["platform"] == meta["platform"], cfg
        assert cfg["input"][0]["data_type"] == "TYPE_FP32" and cfg["input"][0]["dims"] == [1, 28, 28], cfg
        assert cfg["max_batch_size"] >= BATCH and "dynamic_batching" in cfg, cfg
        return f"platform {meta['platform']}, max_batch_size {cfg['max_batch_size']}"

    check("tritonclient.http health, metadata, config", health)
    input_name = meta.get("inputs", [{"name": "input"}])[0]["name"]

    def http_binary():
        worst = 0.0
        for start, x in batches(pixels):
            inp = httpclient.InferInput(input_name, list(x.shape), "FP32")
            inp.set_data_from_numpy(x)  # binary_data=True: the client's default
            res = h.infer(model, [inp])  # no outputs named: all of them, binary
            worst = max(worst, same_predictions(res.as_numpy("logits"), expected, start, "binary"))
            probs = res.as_numpy("probabilities")
            assert np.allclose(probs.sum(axis=1), 1, atol=1e-4)
        return f"{n} images, max |logit diff| {worst:.1e}"

    check("tritonclient.http infer, binary tensors (defaults)", http_binary)

    def http_json():
        for start, x in batches(pixels):
            inp = httpclient.InferInput(input_name, list(x.shape), "FP32")
            inp.set_data_from_numpy(x, binary_data=False)
            outs = [httpclient.InferRequestedOutput("logits", binary_data=False),
                    httpclient.InferRequestedOutput("probabilities", binary_data=False, class_count=3)]
            res = h.infer(model, [inp], outputs=outs, request_id=f"json-{start}")
            same_predictions(res.as_numpy("logits"), expected, start, "json")
            top = res.as_numpy("probabilities")
            assert top.shape == (len(x), 3), top.shape
            want = expected[start:start + len(x)].argmax(axis=1)
            assert np.array_equal(top1_index(top), want), "classification top-1 differs"
            r = res.get_response()
            assert r["id"] == f"json-{start}" and r["model_version"] == "1", r
        return f"{n} images, classification top-3"

    check("tritonclient.http infer, JSON tensors and classification", http_json)

    def http_binary_classification_versioned():
        x = pixels[:8]
        inp = httpclient.InferInput(input_name, list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        outs = [httpclient.InferRequestedOutput("logits", class_count=1)]
        res = h.infer(model, [inp], outputs=outs, model_version="1")
        assert np.array_equal(top1_index(res.as_numpy("logits")), expected[:8].argmax(axis=1))
        try:
            h.infer(model, [inp], model_version="2")
            raise AssertionError("version 2 was answered")
        except InferenceServerException as e:
            assert "404" in str(e.status()) or "unknown version" in e.message(), e
        wrong = httpclient.InferenceServerClient(http_addr)
        wrong.register_plugin(HttpBasicAuth(user, password + "x"))
        try:
            wrong.infer(model, [inp])
            raise AssertionError("a wrong password was answered")
        except InferenceServerException as e:
            assert "401" in str(e.status()), e.status()

    check("tritonclient.http binary classification, versions, wrong password",
          http_binary_classification_versioned)

    # ---- tritonclient.grpc -------------------------------------------------------------
    g = grpcclient.InferenceServerClient(grpc_addr)
    g.register_plugin(GrpcBasicAuth(user, password))

    def grpc_health():
        assert g.is_server_live() and g.is_server_ready() and g.is_model_ready(model)
        assert "binary_tensor_data" in g.get_server_metadata(as_json=True)["extensions"]
        m = g.get_model_metadata(model, as_json=True)
        assert m["name"] == model and m["platform"] == meta["platform"], m
        cfg = g.get_model_config(model, as_json=True)["config"]
        assert cfg["input"][0]["dims"] == ["1", "28", "28"], cfg  # int64 as JSON strings
        assert int(cfg["dynamic_batching"]["max_queue_delay_microseconds"]) >= 0, cfg
        return f"config max_batch_size {cfg['max_batch_size']}"

    check("tritonclient.grpc health, metadata, config", grpc_health)

    def grpc_infer():
        for start, x in batches(pixels):
            inp = grpcclient.InferInput(input_name, list(x.shape), "FP32")
            inp.set_data_from_numpy(x)
            outs = [grpcclient.InferRequestedOutput("logits"),
                    grpcclient.InferRequestedOutput("probabilities", class_count=2)]
            res = g.infer(model, [inp], outputs=outs, request_id=f"g{start}")
            same_predictions(res.as_numpy("logits"), expected, start, "grpc")
            want = expected[start:start + len(x)].argmax(axis=1)
            assert np.array_equal(top1_index(res.as_numpy("probabilities")), want)
            assert res.get_response().id == f"g{start}"
        return f"{n} images"

    check("tritonclient.grpc infer and classification", grpc_infer)

    def grpc_errors():
        x = pixels[:1]
        inp = grpcclient.InferInput(input_name, [1, 784], "FP32")
        inp.set_data_from_numpy(x.reshape(1, 784))
        try:
            g.infer(model, [inp], model_version="7")
            raise AssertionError("version 7 was answered")
        except InferenceServerException as e:
            assert "NOT_FOUND" in str(e.status()), e.status()
        bad = grpcclient.InferInput(input_name, [1, 783], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 783), dtype=np.float32))
        try:
            g.infer(model, [bad])
            raise AssertionError("a [1,783] input was answered")
        except InferenceServerException as e:
            assert "INVALID_ARGUMENT" in str(e.status()), e.status()
        anon = grpcclient.InferenceServerClient(grpc_addr)
        try:
            anon.infer(model, [inp])
            raise AssertionError("no credentials were answered")
        except InferenceServerException as e:
            assert "UNAUTHENTICATED" in str(e.status()), e.status()

    check("tritonclient.grpc NOT_FOUND, INVALID_ARGUMENT, UNAUTHENTICATED", grpc_errors)

    # ---- BYTES inputs: the committed photos as encoded files ----------------------------
    photos_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "images")
    names = sorted(os.listdir(photos_dir))
    files = np.array([open(os.path.join(photos_dir, f), "rb").read() for f in names], dtype=np.object_)
    # The file name is the class: "ankle-boot.webp" -> "Ankle boot".
    want = [f.split(".")[0].replace("-", " ").capitalize() for f in names]

    def classes(logits):
        return [CLASS_NAMES[i] for i in logits.argmax(axis=1)]

    def bytes_inputs():
        inp = httpclient.InferInput("images", [len(files)], "BYTES")
        inp.set_data_from_numpy(files)  # binary: 4-byte length + file per element
        got_http = classes(h.infer(model, [inp]).as_numpy("logits"))
        ginp = grpcclient.InferInput("images", [len(files)], "BYTES")
        ginp.set_data_from_numpy(files)
        got_grpc = classes(g.infer(model, [ginp]).as_numpy("logits"))
        assert got_http == want and got_grpc == want, (got_http, got_grpc, want)
        return f"{len(files)} photos: {', '.join(got_http)}"

    check("tritonclient.http and .grpc BYTES inputs (image files)", bytes_inputs)
    from importlib.metadata import version
    print(f"tritonclient {version('tritonclient')}")


def kserve_clients(http_addr, grpc_addr, model, user, password, pixels, expected):
    import httpx
    from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig

    n = len(pixels)
    input_name = "input"
    token = base64.b64encode(f"{user}:{password}".encode()).decode()

    def kserve_input(x, binary):
        inp = InferInput(name=input_name, shape=list(x.shape), datatype="FP32")
        inp.set_data_from_numpy(x, binary_data=binary)
        return inp

    async def kserve_rest():
        client = InferenceRESTClient(RESTConfig(protocol="v2", auth=httpx.BasicAuth(user, password),
                                                retries=0))
        base = f"http://{http_addr}"
        try:
            assert await client.is_server_live(base) and await client.is_server_ready(base)
            assert await client.is_model_ready(base, model)
            for binary in (False, True):
                for start, x in batches(pixels):
                    req = InferRequest(model_name=model, infer_inputs=[kserve_input(x, binary)],
                                       request_id=f"k{start}")
                    res = await client.infer(base, req, model_name=model)
                    by_name = {o.name: o for o in res.outputs}
                    same_predictions(by_name["logits"].as_numpy(), expected, start,
                                     f"kserve rest binary={binary}")
        finally:
            await client.close()
        return f"{n} images, JSON and binary"

    check("kserve InferenceRESTClient (v2)", lambda: asyncio.run(kserve_rest()))

    async def kserve_grpc():
        client = InferenceGRPCClient(grpc_addr, retries=0)
        headers = [("authorization", f"Basic {token}")]
        try:
            assert await client.is_server_live() and await client.is_server_ready()
            assert await client.is_model_ready(model)
            for start, x in batches(pixels):
                req = InferRequest(model_name=model, infer_inputs=[kserve_input(x, False)],
                                   request_id=f"kg{start}")
                res = await client.infer(req, headers=headers)
                by_name = {o.name: o for o in res.outputs}
                same_predictions(by_name["logits"].as_numpy(), expected, start, "kserve grpc")
        finally:
            await client.close()
        return f"{n} images"

    check("kserve InferenceGRPCClient", lambda: asyncio.run(kserve_grpc()))
    from importlib.metadata import version
    print(f"kserve {version('kserve')}")


def main() -> int:
    family, http_addr, grpc_addr, model, data, logits_json = sys.argv[1:7]
    user = os.environ["FMNIST_TEST_USER"]
    password = os.environ["FMNIST_TEST_PASSWORD"]
    rows = np.loadtxt(data, delimiter=",", skiprows=1, dtype=np.float32)
    pixels = (rows[:, 1:] / np.float32(255.0)).reshape(-1, 1, 28, 28)
    with open(logits_json) as f:
        expected = np.asarray(json.load(f)["logits"], dtype=np.float32)
    assert len(expected) == len(pixels), "eval logits and data differ in length"
    run = {"triton": triton, "kserve": kserve_clients}[family]
    run(http_addr, grpc_addr, model, user, password, pixels, expected)
    print(f"{family}: {results['passed']} passed, {results['failed']} failed")
    return 0 if results["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
