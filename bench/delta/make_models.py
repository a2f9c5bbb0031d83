#!/usr/bin/env python3
"""Generates FP32 ONNX models for bench/delta: a base and versions of it with a share of the
weights changed, in two patterns (see bench/README.md, "Model deltas"):

  layers-P     whole tensors changed (fine-tuning some layers): tensors picked at random until
               they hold P% of the weights; every weight in them gets a small update;
  scattered-P  P% of all weights, picked one by one at random across every tensor (full
               fine-tuning with sparse updates), each gets a small update.

An update is w += N(0, (UPDATE * std of the tensor)^2), so a typical weight moves by about
UPDATE relative: the sign and exponent byte mostly stay, the low mantissa bytes change.
Weights are N(0, 1/fan_in) (He/LeCun-like scale), biases small. The graph is a chain of
MatMul + Add + Relu layers; it passes onnx.checker. Prints one JSON line per file written.

Usage: make_models.py OUT_DIR [--mib 16] [--fractions 1,10,50] [--update 0.01] [--seed 1]
"""
import argparse
import json
import os
import sys

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def layer_dims(mib):
    """(in, out) of a chain of layers: wide 512<->256 layers with narrow 16-wide adapters
    every fourth layer, so tensors come in sizes fine enough to pick 1% of the weights."""
    dims = []
    total = 0
    width = 512
    i = 0
    while total < mib * (1 << 20):
        out = 256 if width == 512 else 512
        dims.append((width, out))
        total += 4 * width * out
        width = out
        i += 1
        if i % 4 == 0:
            dims.append((width, 16))
            dims.append((16, width))
            total += 4 * 2 * width * 16
    return dims


def make_weights(dims, rng):
    tensors = []
    for idx, (fan_in, fan_out) in enumerate(dims):
        w = rng.normal(0.0, 1.0 / np.sqrt(fan_in), size=(fan_in, fan_out)).astype(np.float32)
        b = rng.normal(0.0, 0.01, size=(fan_out,)).astype(np.float32)
        tensors.append((f"layer{idx}.weight", w))
        tensors.append((f"layer{idx}.bias", b))
    return tensors


def build_model(dims, tensors):
    nodes = []
    x = "input"
    by_name = dict(tensors)
    for idx, (_, fan_out) in enumerate(dims):
        mm, add, relu = f"mm{idx}", f"add{idx}", f"relu{idx}"
        nodes.append(helper.make_node("MatMul", [x, f"layer{idx}.weight"], [mm], name=mm))
        nodes.append(helper.make_node("Add", [mm, f"layer{idx}.bias"], [add], name=add))
        nodes.append(helper.make_node("Relu", [add], [relu], name=relu))
        x = relu
    graph = helper.make_graph(
        nodes, "delta_bench_mlp",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", dims[0][0]])],
        [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["batch", dims[-1][1]])],
        initializer=[numpy_helper.from_array(by_name[n], n) for n, _ in tensors])
    model = helper.make_model(graph, producer_name="outpost-bench-delta",
                              opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def perturb(values, rng, update):
    std = float(values.std()) if values.size > 1 else abs(float(values[0])) or 1.0
    return (values + rng.normal(0.0, update * std, size=values.shape)).astype(np.float32)


def changed_layers(tensors, fraction, rng, update):
    """Whole tensors, picked in random order, each taken while it still fits under the share;
    the share actually changed is returned (close to, not exactly, the fraction)."""
    total = sum(t.size for _, t in tensors)
    budget = fraction * total
    order = rng.permutation(len(tensors))
    out = [(n, t.copy()) for n, t in tensors]
    changed = 0
    for i in order:
        n, t = out[i]
        if changed + t.size <= budget * 1.02:
            out[i] = (n, perturb(t, rng, update))
            changed += t.size
    return out, changed / total


def changed_scattered(tensors, fraction, rng, update):
    total = 0
    changed = 0
    out = []
    for n, t in tensors:
        flat = t.copy().reshape(-1)
        mask = rng.random(flat.size) < fraction
        std = float(t.std()) if t.size > 1 else 1.0
        flat[mask] = (flat[mask] + rng.normal(0.0, update * std, size=int(mask.sum()))).astype(
            np.float32)
        out.append((n, flat.reshape(t.shape)))
        total += t.size
        changed += int(np.count_nonzero(flat != t.reshape(-1)))
    return out, changed / total


def save(model, path, **info):
    onnx.save(model, path)
    info.update(path=path, bytes=os.path.getsize(path))
    print(json.dumps(info), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--mib", type=float, default=16)
    ap.add_argument("--fractions", default="1,10,50")
    ap.add_argument("--update", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    os.makedirs(args.out_dir, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    dims = layer_dims(args.mib)
    base = make_weights(dims, rng)
    weights = sum(t.size for _, t in base)
    save(build_model(dims, base), os.path.join(args.out_dir, "base.onnx"), name="base",
         tensors=len(base), weights=weights, changed=0.0)
    for pct in [float(p) for p in args.fractions.split(",")]:
        for pattern, fn in (("layers", changed_layers), ("scattered", changed_scattered)):
            tensors, share = fn(base, pct / 100.0, rng, args.update)
            name = f"{pattern}-{pct:g}"
            save(build_model(dims, tensors), os.path.join(args.out_dir, name + ".onnx"),
                 name=name, pattern=pattern, fraction=pct / 100.0, changed=share,
                 update=args.update)
    return 0


if __name__ == "__main__":
    sys.exit(main())
