#!/usr/bin/python3
"""ONNX backend conformance through Outpost's real path, as a user would run it.

Every model of the ONNX project's backend test data (Debian's libonnx-testdata) is pushed with
`outpost model push`, deployed to a real `outpost-agent` with `outpost apply`, and each of its
test data sets is sent to the deployment's Open Inference Protocol route twice: once as JSON
(when JSON can spell every value) and once with the binary tensor extension. Answers are
compared with the expected outputs. The run fails on a crash of any Outpost process, a wrong
answer, or a refusal that the EXPECTED table below does not explain with a matching reason.

Usage: onnx_backend_conformance.py --bin BUILD_DIR [--data DIR] [--suites node,simple,...]
       [--only REGEX] [--batch N] [--report FILE] [-v]
"""

import argparse
import concurrent.futures
import fnmatch
import glob
import http.client
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
from onnx import numpy_helper

DEFAULT_DATA = "/usr/share/libonnx-testdata/data"
DEFAULT_SUITES = ["node", "simple", "pytorch-converted", "pytorch-operator"]

# Cases whose answer cannot be compared, or that Outpost or the runtime refuses, each with the
# reason and what the refusal must say. Patterns match "suite/case" (fnmatch). A case listed
# here that does not fail the way it says fails the run too, so the table cannot go stale.
#   ("values", why)            served and answered; shapes and datatypes are checked, values
#                              are not (random ops, or outputs the ONNX spec leaves open)
#   ("push", regex, why)       `outpost model push` refuses the model with a message matching
#   ("load", regex, why)       pushed and applied; the agent reports the deployment failed
#                              with a message matching
#   ("infer", regex, why)      served; inference fails with a message matching
#   ("tolerance", k, why)      values compared with atol = k * max|expected| besides rtol 1e-3
TRAINING = "the training ops of ai.onnx.preview.training are not in ONNX Runtime's inference build"
NO_KERNEL = r"Could not find an implementation for {}.*no CPU kernel"
OLD_OPSET = ("ONNX Runtime has no CPU kernel for this op at opset < 7 (the pytorch-converted and "
             "-operator models are exported at opset 6 and older); the agent's message says to "
             "re-export at a newer opset")
NOT_TENSORS = ("push", r"(input|output) '.*' is an? (OPTIONAL|SEQUENCE); the model server "
               r"serves tensors only", "sequences and optional values are not served")
EXPECTED = {
    # Random ops: the answer is random by definition, so only its shape and type are checked.
    "node/test_bernoulli*": ("values", "Bernoulli draws random values"),
    "node/test_training_dropout*": ("values", "Dropout in training mode drops at random"),
    # Where ONNX 1.12's expected outputs and ONNX Runtime read the spec differently.
    "node/test_resize_downsample_scales_*_align_corners": (
        "values", "align_corners with a downsampling scale: the expected output divides by "
        "length*scale-1 (1.4), ONNX Runtime by the output length-1 (1)"),
    "node/test_maxunpool_export_with_output_shape": (
        "values", "the expected output re-maps the indices into the larger output_shape; ONNX "
        "Runtime writes them as flat indices of the output, as the indices input says"),
    "node/test_*cast*FLOAT_to_STRING*": (
        "values", "ONNX Runtime formats floats with 8 significant digits (0.60484552), the "
        "reference with the shortest form (0.6048455)"),
    "node/test_cast_FLOAT_to_BFLOAT16": (
        "values", "ONNX 1.12's expected bfloat16 values truncate the float; ONNX Runtime rounds "
        "to nearest even (one bfloat16 ulp apart)"),
    # Test data that does not fit its own model: refused with both shapes, as the runtime would.
    "node/test_castlike_*BFLOAT16*": (
        "infer", r"input 'like': shape \[1\] does not match the model's \[3,4\]",
        "the test data's 'like' input has shape [1] where the model declares [3,4]"),
    # Float32 transforms summing many products: the reference is computed in float64.
    "node/test_dft*": ("tolerance", 1e-5, "float32 DFT against a float64 reference"),
    "node/test_stft*": ("tolerance", 1e-5, "float32 STFT against a float64 reference"),
    # Kernels ONNX Runtime's CPU provider does not have: refused at load, and said so.
    "node/test_max_*int16": ("load", NO_KERNEL.format(r"Max\(13\)"), "no Max for 16-bit integers"),
    "node/test_min_*int16": ("load", NO_KERNEL.format(r"Min\(13\)"), "no Min for 16-bit integers"),
    "node/test_bitshift_*_uint16": ("load", NO_KERNEL.format(r"BitShift\(11\)"),
                                    "no BitShift for uint16"),
    "node/test_pow_types_float32_uint*": ("load", NO_KERNEL.format(r"Pow\(15\)"),
                                          "no Pow with an unsigned exponent"),
    "node/test_*_batchwise": ("load", r"Batchwise recurrent operations \(layout == 1\) are not "
                              "supported", "ONNX Runtime's RNN, GRU and LSTM lack layout=1"),
    "pytorch-*/test_*": ("load", NO_KERNEL.format(
        r"(Add|Mul|Gemm|PRelu|BatchNormalization|AveragePool|Pow)\((1|6)\)"), OLD_OPSET),
    "simple/test_gradient_of_add*": ("load", r"Gradient.*is not a registered function/op",
                                     TRAINING),
    # A graph without inputs is a constant: the registry refuses it rather than serve nothing.
    "node/test_constant": ("push", r"has no inputs", "a graph with no inputs has nothing to serve"),
    # Training ops (ai.onnx.preview.training): refused by the runtime at load.
    "node/test_adagrad*": ("load", r"Adagrad|ai\.onnx\.preview\.training", TRAINING),
    "node/test_adam*": ("load", r"Adam|ai\.onnx\.preview\.training", TRAINING),
    "node/test_momentum*": ("load", r"Momentum|ai\.onnx\.preview\.training", TRAINING),
    "node/test_nesterov_momentum*": ("load", r"Momentum|ai\.onnx\.preview\.training", TRAINING),
    # Graph inputs or outputs that are not tensors: the model server serves tensors only, and
    # the registry says so at push time rather than letting a device fail to load it.
    "node/test_sequence_*": NOT_TENSORS,
    "node/test_optional_*": NOT_TENSORS,
    "node/test_if_seq*": NOT_TENSORS,
    "node/test_if_opt*": NOT_TENSORS,
    "node/test_loop13_seq*": NOT_TENSORS,
    "node/test_loop16_seq_none*": NOT_TENSORS,
    "node/test_split_to_sequence*": NOT_TENSORS,
    "node/test_identity_sequence*": NOT_TENSORS,
    "node/test_identity_opt*": NOT_TENSORS,
    "node/test_concat_from_sequence*": NOT_TENSORS,
}


class Failure(Exception):
    pass


def expectation(case):
    for pattern, value in EXPECTED.items():
        if fnmatch.fnmatch(case, pattern):
            return value
    return None


# ---- processes

class Outpost:
    """A real `outpost server` and one `outpost-agent`, in a temporary directory."""

    def __init__(self, bin_dir, root, verbose):
        self.bin_dir = bin_dir
        self.root = root
        self.verbose = verbose
        self.server = None
        self.agent = None
        self.url = None
        self.agent_url = None
        self.env = None

    def start(self):
        data = os.path.join(self.root, "server")
        self.server_log = os.path.join(self.root, "server.log")
        self.server = subprocess.Popen(
            [os.path.join(self.bin_dir, "outpost"), "server", "--listen", "127.0.0.1:0",
             "--data", data],
            stdout=open(self.server_log, "wb"), stderr=subprocess.STDOUT)
        deadline = time.time() + 60
        while time.time() < deadline:
            text = open(self.server_log, errors="replace").read()
            m = re.search(r"listening on (https://127\.0\.0\.1:\d+)", text)
            if m and os.path.exists(os.path.join(data, "admin.token")):
                self.url = m.group(1)
                break
            if self.server.poll() is not None:
                raise Failure("the server exited at start:\n" + text)
            time.sleep(0.05)
        else:
            raise Failure("the server never said where it listens")
        token = open(os.path.join(data, "admin.token")).read().strip()
        # Over HTTPS with the server's development CA: the CLI trusts it by file, the agent by
        # the pin its enrollment token comes with.
        self.env = dict(os.environ, OUTPOST_SERVER=self.url, OUTPOST_TOKEN=token,
                        OUTPOST_CA_FILE=os.path.join(data, "tls", "ca.pem"),
                        XDG_CONFIG_HOME=os.path.join(self.root, "config"))
        enroll = self.cli_json(["token", "create", "--site", "conformance", "--uses", "1"])
        if not enroll.get("ca_pin", "").startswith("sha256:"):
            raise Failure(f"an HTTPS server's enrollment token has no CA pin: {enroll}")
        agent_data = os.path.join(self.root, "agent")
        self.agent_log = os.path.join(self.root, "agent.log")
        self.agent = subprocess.Popen(
            [os.path.join(self.bin_dir, "outpost-agent"), "--data", agent_data, "--listen",
             "127.0.0.1:0", "--server", self.url, "--enroll-token", enroll["token"],
             "--ca-pin", enroll["ca_pin"]],
            stdout=open(self.agent_log, "wb"), stderr=subprocess.STDOUT)
        addr_file = os.path.join(agent_data, "agent.addr")
        deadline = time.time() + 60
        while time.time() < deadline:
            self.check_alive()
            if os.path.exists(addr_file) and open(addr_file).read().strip():
                addr = open(addr_file).read().strip()
                self.agent_url = addr if addr.startswith("http") else "http://" + addr
                try:
                    self.agent_get("/v1/status")
                    return
                except OSError:
                    pass
            time.sleep(0.05)
        raise Failure("the agent's local API never answered")

    def check_alive(self):
        """Fails the run when the server or the agent has died (a crash is never explained)."""
        for name, proc, log in (("outpost server", self.server, getattr(self, "server_log", "")),
                                ("outpost-agent", self.agent, getattr(self, "agent_log", ""))):
            if proc is not None and proc.poll() is not None:
                tail = open(log, errors="replace").read()[-4000:] if log else ""
                raise Failure(f"{name} died (exit {proc.returncode}):\n{tail}")

    def stop(self):
        """Stops both gracefully; returns what went wrong on the way out (a sanitizer report at
        exit, a hang), or "" when both exited cleanly."""
        problems = []
        for name, proc, log in (("outpost-agent", self.agent, getattr(self, "agent_log", "")),
                                ("outpost server", self.server, getattr(self, "server_log", ""))):
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                problems.append(f"{name} did not stop within 60 s of SIGTERM")
                continue
            if proc.returncode != 0:
                tail = open(log, errors="replace").read()[-3000:] if log else ""
                problems.append(f"{name} exited with {proc.returncode} on SIGTERM:\n{tail}")
        return "\n".join(problems)

    def cli(self, args, stdin=None):
        r = subprocess.run([os.path.join(self.bin_dir, "outpost")] + args, env=self.env,
                           input=stdin, capture_output=True, text=True, timeout=120)
        # A signal (abort from an uncaught exception, a sanitizer report) is a crash.
        if r.returncode < 0 or r.returncode >= 128 or "terminate called" in r.stderr:
            raise Failure(f"`outpost {' '.join(args)}` crashed (exit {r.returncode}):\n{r.stderr}")
        return r

    def cli_json(self, args, stdin=None):
        r = self.cli(args + ["-o", "json"], stdin)
        if r.returncode != 0:
            raise Failure(f"`outpost {' '.join(args)}` failed: {r.stderr.strip()}")
        return json.loads(r.stdout)

    def agent_request(self, method, path, body=None, headers=None, timeout=60):
        host = self.agent_url.split("://", 1)[1]
        conn = http.client.HTTPConnection(host, timeout=timeout)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def agent_get(self, path):
        status, _, body = self.agent_request("GET", path)
        if status != 200:
            raise Failure(f"GET {path} on the agent: {status} {body[:300]!r}")
        return json.loads(body)


# ---- test data

class Case:
    def __init__(self, suite, name, directory):
        self.suite = suite
        self.name = name
        self.dir = directory
        self.id = f"{suite}/{name}"
        self.expect = expectation(self.id)
        # A refusal listed for a whole suite (old opsets) binds only the cases that fail.
        self.expect_is_pattern_wide = any(
            fnmatch.fnmatch(self.id, p) and p.endswith("/test_*") for p in EXPECTED)
        self.outcome = None  # "pass", "explained", "fail"
        self.detail = ""
        # Model and deployment names: DNS labels, unique, recognisable.
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower().removeprefix("test_")).strip("-")
        self.slug = slug

    def load(self):
        model = onnx.load(os.path.join(self.dir, "model.onnx"), load_external_data=False)
        inits = {i.name for i in model.graph.initializer}
        graph_inputs = [i for i in model.graph.input if i.name not in inits]
        self.input_names = [i.name for i in graph_inputs]
        self.output_names = [o.name for o in model.graph.output]
        in_types = [i.type.tensor_type.elem_type for i in graph_inputs]
        out_types = [o.type.tensor_type.elem_type for o in model.graph.output]
        self.data_sets = []
        for ds in sorted(glob.glob(os.path.join(self.dir, "test_data_set_*"))):
            inputs = [as_declared(read_tensor(p), t)
                      for p, t in zip(sorted_pb(ds, "input"), in_types + [0] * 99)]
            outputs = [as_declared(read_tensor(p), t)
                       for p, t in zip(sorted_pb(ds, "output"), out_types + [0] * 99)]
            self.data_sets.append((os.path.basename(ds), inputs, outputs))


def sorted_pb(directory, kind):
    files = glob.glob(os.path.join(directory, f"{kind}_*.pb"))
    return sorted(files, key=lambda p: int(re.search(r"_(\d+)\.pb$", p).group(1)))


def read_tensor(path):
    """A test data file: a TensorProto, or for sequence/optional cases another proto."""
    raw = open(path, "rb").read()
    t = onnx.TensorProto()
    try:
        t.ParseFromString(raw)
        if t.data_type == 0:
            raise ValueError("not a tensor")
        return {"array": numpy_helper.to_array(t), "onnx_type": t.data_type}
    except Exception:
        return {"array": None, "onnx_type": None}


def as_declared(tensor, declared):
    """ONNX 1.12's test data keeps bfloat16 values as their 16-bit patterns (UINT16 tensors);
    where the graph declares BFLOAT16 they are read as such. BF16 arrays here hold the bits."""
    a = tensor["array"]
    if declared == onnx.TensorProto.BFLOAT16 and a is not None:
        if a.dtype != np.uint16:
            a = (np.ascontiguousarray(a.astype(np.float32)).view(np.uint32) >> 16).astype(np.uint16)
        return {"array": a, "onnx_type": onnx.TensorProto.BFLOAT16}
    return tensor


def bf16_values(bits):
    return (np.asarray(bits, dtype=np.uint32) << 16).view(np.float32)


def find_cases(data_dir, suites, only):
    cases = []
    for suite in suites:
        for d in sorted(glob.glob(os.path.join(data_dir, suite, "*"))):
            if not os.path.exists(os.path.join(d, "model.onnx")):
                continue
            c = Case(suite, os.path.basename(d), d)
            if only and not re.search(only, c.id):
                continue
            cases.append(c)
    # Slugs must be unique across suites (the same op is tested in several).
    seen = {}
    for c in cases:
        base = c.slug[:40].strip("-")
        n = seen.get(base, 0)
        seen[base] = n + 1
        c.slug = f"{base}-{n}" if n else base
        c.model = "c-" + c.slug
        c.deployment = "c-" + c.slug
    return cases


# ---- the protocol

PROTOCOL_TYPES = {
    np.dtype("bool"): "BOOL", np.dtype("uint8"): "UINT8", np.dtype("uint16"): "UINT16",
    np.dtype("uint32"): "UINT32", np.dtype("uint64"): "UINT64", np.dtype("int8"): "INT8",
    np.dtype("int16"): "INT16", np.dtype("int32"): "INT32", np.dtype("int64"): "INT64",
    np.dtype("float16"): "FP16", np.dtype("float32"): "FP32", np.dtype("float64"): "FP64",
}
NUMPY_TYPES = {v: k for k, v in PROTOCOL_TYPES.items()}


def protocol_type(tensor):
    if tensor["onnx_type"] == onnx.TensorProto.BFLOAT16:
        return "BF16"
    a = tensor["array"]
    if a.dtype == object or a.dtype.kind in "SU":
        return "BYTES"
    if a.dtype not in PROTOCOL_TYPES:
        raise Failure(f"the test data has a {a.dtype} tensor this driver cannot send")
    return PROTOCOL_TYPES[a.dtype]


def as_bytes(value):
    return value if isinstance(value, bytes) else str(value).encode()


def json_values(tensor, dtype):
    """The elements for JSON, or None when JSON cannot spell one of them (NaN, infinity,
    strings that are not UTF-8)."""
    a = tensor["array"]
    flat = a.reshape(-1)
    if dtype == "BYTES":
        try:
            return [as_bytes(v).decode("utf-8") for v in flat]
        except UnicodeDecodeError:
            return None
    if dtype == "BF16":
        flat = bf16_values(flat)
    if dtype in ("FP16", "FP32", "FP64", "BF16"):
        if not np.all(np.isfinite(flat)):
            return None
        return [float(v) for v in flat]
    if dtype == "BOOL":
        return [bool(v) for v in flat]
    return [int(v) for v in flat]


def binary_bytes(tensor, dtype):
    a = tensor["array"]
    if dtype == "BYTES":
        out = bytearray()
        for v in a.reshape(-1):
            b = as_bytes(v)
            out += len(b).to_bytes(4, "little") + b
        return bytes(out)
    if dtype == "BF16":
        return np.ascontiguousarray(a).astype("<u2").tobytes()
    return np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<")).tobytes()


def decode_binary(raw, dtype, shape):
    if dtype == "BYTES":
        values, at = [], 0
        while at < len(raw):
            n = int.from_bytes(raw[at:at + 4], "little")
            values.append(raw[at + 4:at + 4 + n])
            at += 4 + n
        return np.array(values, dtype=object).reshape(shape)
    if dtype == "BF16":
        return np.frombuffer(raw, dtype="<u2").astype(np.uint16).reshape(shape)
    return np.frombuffer(raw, dtype=NUMPY_TYPES[dtype].newbyteorder("<")).reshape(shape)


def infer_json(op, case, inputs):
    body = {"id": case.slug, "inputs": []}
    for name, t in zip(case.input_names, inputs):
        dtype = protocol_type(t)
        values = json_values(t, dtype)
        if values is None:
            return None  # not expressible; the binary request covers it
        body["inputs"].append({"name": name, "datatype": dtype,
                               "shape": list(t["array"].shape), "data": values})
    status, _, raw = op.agent_request("POST", f"/models/{case.deployment}/infer",
                                      json.dumps(body).encode(),
                                      {"Content-Type": "application/json"})
    if status != 200:
        return status, raw.decode(errors="replace"), None
    answer = json.loads(raw)
    outputs = {}
    for o in answer["outputs"]:
        dtype = o["datatype"]
        data = o["data"]
        if dtype == "BYTES":
            arr = np.array([s.encode() for s in data], dtype=object).reshape(o["shape"])
        elif dtype == "BF16":
            conv = [np.nan if v is None else v for v in data]
            f = np.array(conv, dtype=np.float32).reshape(o["shape"])
            arr = (np.ascontiguousarray(f).view(np.uint32) >> 16).astype(np.uint16)
        else:
            np_type = NUMPY_TYPES[dtype]
            conv = [np.nan if v is None else v for v in data]
            arr = np.array(conv, dtype=np.float64 if dtype.startswith("FP") else np_type)
            arr = arr.astype(np_type).reshape(o["shape"])
        outputs[o["name"]] = (dtype, arr)
    return status, None, outputs


def infer_binary(op, case, inputs):
    header = {"id": case.slug, "inputs": [], "parameters": {"binary_data_output": True}}
    blobs = []
    for name, t in zip(case.input_names, inputs):
        dtype = protocol_type(t)
        blob = binary_bytes(t, dtype)
        header["inputs"].append({"name": name, "datatype": dtype,
                                 "shape": list(t["array"].shape),
                                 "parameters": {"binary_data_size": len(blob)}})
        blobs.append(blob)
    head = json.dumps(header).encode()
    status, headers, raw = op.agent_request(
        "POST", f"/models/{case.deployment}/infer", head + b"".join(blobs),
        {"Content-Type": "application/octet-stream",
         "Inference-Header-Content-Length": str(len(head))})
    if status != 200:
        return status, raw.decode(errors="replace"), None
    length = {k.lower(): v for k, v in headers.items()}.get("inference-header-content-length")
    if length is None:
        raise Failure(f"{case.id}: binary answer without Inference-Header-Content-Length")
    length = int(length)
    answer = json.loads(raw[:length])
    at = length
    outputs = {}
    for o in answer["outputs"]:
        size = o.get("parameters", {}).get("binary_data_size")
        if size is None:
            raise Failure(f"{case.id}: output {o['name']} not sent binary as asked")
        outputs[o["name"]] = (o["datatype"], decode_binary(raw[at:at + size], o["datatype"],
                                                           o["shape"]))
        at += size
    if at != len(raw):
        raise Failure(f"{case.id}: {len(raw) - at} bytes after the last binary output")
    return status, None, outputs


def compare(case, expected_outputs, outputs, how, values_checked, atol_scale=0.0):
    problems = []
    for name, want in zip(case.output_names, expected_outputs):
        if name not in outputs:
            problems.append(f"{how}: output '{name}' missing (got {sorted(outputs)})")
            continue
        dtype, got = outputs[name]
        if want["array"] is None:
            continue
        w = want["array"]
        want_type = protocol_type(want)
        if dtype != want_type:
            problems.append(f"{how}: output '{name}' is {dtype}, expected {want_type}")
            continue
        if tuple(got.shape) != tuple(w.shape):
            problems.append(f"{how}: output '{name}' shape {list(got.shape)}, "
                            f"expected {list(w.shape)}")
            continue
        if not values_checked:
            continue
        if dtype == "BYTES":
            g = [as_bytes(v) for v in got.reshape(-1)]
            e = [as_bytes(v) for v in w.reshape(-1)]
            if g != e:
                problems.append(f"{how}: output '{name}' {g[:5]} != {e[:5]}")
            continue
        if dtype in ("FP16", "FP32", "FP64", "BF16"):
            # The ONNX backend runner's own tolerance.
            if dtype == "BF16":
                got, w = bf16_values(got), bf16_values(w)
            gf = got.astype(np.float64)
            wf = w.astype(np.float64)
            atol = 1e-7
            if atol_scale and wf.size and np.any(np.isfinite(wf)):
                atol = max(atol, atol_scale * float(np.nanmax(np.abs(wf[np.isfinite(wf)]))))
            if how == "json":
                # JSON has no NaN or infinity: they come back as null (read here as NaN).
                finite = np.isfinite(wf)
                ok = np.all(np.isnan(gf[~finite])) and np.allclose(
                    gf[finite], wf[finite], rtol=1e-3, atol=atol)
            else:
                ok = np.allclose(gf, wf, rtol=1e-3, atol=atol, equal_nan=True)
            if not ok:
                diff = np.nanmax(np.abs(gf - wf)) if gf.size else 0
                problems.append(f"{how}: output '{name}' differs (max |diff| {diff:g})")
            continue
        if not np.array_equal(got, w):
            problems.append(f"{how}: output '{name}' values differ: {got.reshape(-1)[:8]} vs "
                            f"{w.reshape(-1)[:8]}")
    return problems


# ---- the run

def push(op, case):
    r = op.cli(["model", "push", case.model, "1.0.0", "--variant",
                "accelerator=cpu=" + os.path.join(case.dir, "model.onnx")])
    return r


def apply(op, case):
    manifest = {"apiVersion": "outpost/v1", "kind": "Deployment",
                "metadata": {"name": case.deployment},
                "spec": {"selector": {"sites": ["conformance"]},
                         "model": {"name": case.model, "version": "1.0.0"},
                         "serve": {"route": f"/models/{case.deployment}"}}}
    r = op.cli(["apply", "-f", "-"], json.dumps(manifest))
    if r.returncode != 0:
        raise Failure(f"{case.id}: apply failed: {r.stderr.strip()}")


def settle(op, cases, timeout):
    """Waits until every case's deployment is served or failed; returns name -> (state, why)."""
    pending = {c.deployment for c in cases}
    result = {}
    deadline = time.time() + timeout
    while pending and time.time() < deadline:
        op.check_alive()
        services = {s["deployment"]: s for s in op.agent_get("/v1/services")}
        status = {d["name"]: d for d in op.agent_get("/v1/status").get("deployments", [])}
        for name in list(pending):
            s = services.get(name)
            d = status.get(name, {})
            if s and s.get("state") in ("ready", "degraded") and d.get("phase") == "running":
                result[name] = ("served", "")
                pending.discard(name)
            elif d.get("phase") in ("failed", "rolled-back"):
                why = d.get("message", "")
                if s and s.get("primary", {}).get("error"):
                    why += " | " + s["primary"]["error"]
                result[name] = ("failed", why)
                pending.discard(name)
        if pending:
            time.sleep(0.2)
    for name in pending:
        d = {x["name"]: x for x in op.agent_get("/v1/status").get("deployments", [])}.get(name, {})
        result[name] = ("timeout", f"phase {d.get('phase')!r}: {d.get('message', '')}")
    return result


def run_case(op, case):
    """Infers every data set; returns a list of problems (empty = passed)."""
    values_checked = not (case.expect and case.expect[0] == "values")
    atol_scale = case.expect[1] if case.expect and case.expect[0] == "tolerance" else 0.0
    problems = []
    for ds_name, inputs, outputs in case.data_sets:
        if len(inputs) != len(case.input_names) or any(t["array"] is None for t in inputs):
            problems.append(f"{ds_name}: test inputs do not match the graph's inputs")
            continue
        for how, fn in (("json", infer_json), ("binary", infer_binary)):
            got = fn(op, case, inputs)
            if got is None:
                continue
            status, error, outs = got
            if status != 200:
                problems.append(f"{ds_name} {how}: HTTP {status}: {error[:400]}")
                continue
            problems += [f"{ds_name} {p}" for p in
                         compare(case, outputs, outs, how, values_checked, atol_scale)]
    return problems


def judge(case, stage, message):
    """A refusal at `stage`: explained when EXPECTED says so with a matching message."""
    e = case.expect
    if e and e[0] == stage and re.search(e[1], message):
        case.outcome, case.detail = "explained", f"{stage}: {e[2]}"
    else:
        case.outcome, case.detail = "fail", f"refused at {stage}: {message.strip()[:600]}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bin", required=True, help="directory with outpost and outpost-agent")
    ap.add_argument("--data", default=DEFAULT_DATA, help="the ONNX backend test data")
    ap.add_argument("--suites", default=",".join(DEFAULT_SUITES))
    ap.add_argument("--only", help="regular expression on suite/case")
    ap.add_argument("--sample", type=int, default=1,
                    help="run every Nth case, plus the first case of each EXPECTED entry and "
                         "the FP16/BF16/STRING casts (the sanitizer build's shorter pass)")
    ap.add_argument("--batch", type=int, default=150, help="deployments on the agent at once")
    ap.add_argument("--jobs", type=int, default=4, help="CLI calls and inferences in parallel")
    ap.add_argument("--settle-timeout", type=float, default=120)
    ap.add_argument("--report", help="write every case's outcome here (JSON)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args()

    if not os.path.isdir(args.data):
        print(f"onnx conformance: no test data at {args.data} "
              "(scripts/install-deps installs libonnx-testdata)", file=sys.stderr)
        return 1
    cases = find_cases(args.data, args.suites.split(","), args.only)
    if not cases:
        print("onnx conformance: no case matched", file=sys.stderr)
        return 1
    if args.sample > 1:
        # Every Nth case, the FP16/BF16/STRING casts, and the first case of each EXPECTED
        # refusal (each refusal path runs once).
        first_of = {}
        for c in cases:
            for pattern in EXPECTED:
                if fnmatch.fnmatch(c.id, pattern):
                    first_of.setdefault(pattern, c.id)
        keep = set(first_of.values())
        cases = [c for i, c in enumerate(cases)
                 if i % args.sample == 0 or c.id in keep
                 or re.search(r"cast(like)?_(FLOAT16|BFLOAT16|STRING|FLOAT_to_(FLOAT16|BFLOAT16|STRING))|strnorm", c.id)]
        print(f"onnx conformance: a sample of {len(cases)} cases (--sample {args.sample})")
    started = time.time()
    root = tempfile.mkdtemp(prefix="outpost-onnx-conformance-")
    op = Outpost(args.bin, root, args.verbose)
    pool = concurrent.futures.ThreadPoolExecutor(args.jobs)
    try:
        op.start()
        for c in cases:
            c.load()
        for first in range(0, len(cases), args.batch):
            batch = cases[first:first + args.batch]
            # Push, in parallel; a refusal here is judged, a crash fails the run.
            applied = []
            for c, r in zip(batch, pool.map(lambda c: push(op, c), batch)):
                if r.returncode != 0:
                    judge(c, "push", r.stderr)
                else:
                    applied.append(c)
            list(pool.map(lambda c: apply(op, c), applied))
            states = settle(op, applied, args.settle_timeout)
            served = []
            for c in applied:
                state, why = states[c.deployment]
                if state == "served":
                    served.append(c)
                elif state == "failed":
                    judge(c, "load", why)
                else:
                    c.outcome, c.detail = "fail", f"never served within {args.settle_timeout:.0f} s: {why}"
            for c, problems in zip(served, pool.map(lambda c: run_case(op, c), served)):
                if not problems:
                    if c.expect and c.expect[0] not in ("values", "tolerance") and not \
                            c.expect_is_pattern_wide:
                        c.outcome = "fail"
                        c.detail = f"EXPECTED says it is refused at {c.expect[0]}, but it passed"
                    else:
                        checked = not c.expect or c.expect[0] != "values"
                        c.outcome = "pass" if checked else "explained"
                        c.detail = "" if checked else f"values: {c.expect[1]}"
                else:
                    infer_refusals = [p for p in problems if "HTTP" in p]
                    if c.expect and c.expect[0] == "infer" and infer_refusals and all(
                            re.search(c.expect[1], p) for p in infer_refusals):
                        c.outcome, c.detail = "explained", f"infer: {c.expect[2]}"
                    else:
                        c.outcome, c.detail = "fail", "; ".join(problems)[:1200]
            op.check_alive()
            for c in applied:
                r = op.cli(["deployment", "delete", c.deployment])
                if r.returncode != 0:
                    raise Failure(f"deleting {c.deployment}: {r.stderr.strip()}")
            done = first + len(batch)
            passed = sum(1 for c in cases[:done] if c.outcome == "pass")
            print(f"onnx conformance: {done}/{len(cases)} cases, {passed} passed "
                  f"({time.time() - started:.0f} s)", flush=True)
        op.check_alive()
    except Failure as e:
        print(f"onnx conformance: FAILED: {e}", file=sys.stderr)
        return 1
    finally:
        pool.shutdown(wait=True)
        stop_problems = op.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"onnx conformance: kept {root}")

    if stop_problems:
        print(f"onnx conformance: FAILED at shutdown: {stop_problems}", file=sys.stderr)
        return 1
    failed = [c for c in cases if c.outcome == "fail"]
    explained = [c for c in cases if c.outcome == "explained"]
    passed = [c for c in cases if c.outcome == "pass"]
    for c in explained if args.verbose else []:
        print(f"  explained {c.id}: {c.detail}")
    for c in failed:
        print(f"  FAIL {c.id}: {c.detail}")
    if args.report:
        with open(args.report, "w") as f:
            json.dump([{"case": c.id, "outcome": c.outcome, "detail": c.detail} for c in cases],
                      f, indent=1)
    print(f"onnx conformance: {len(passed)} passed, {len(explained)} explained "
          f"(skipped or refused for a listed reason), {len(failed)} failed, of {len(cases)} "
          f"in {time.time() - started:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
