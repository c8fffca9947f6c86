"""The fused chain of dense layers (_core.DenseChain) against the same layers one by one
(_core.dense_packed, each writing its output to memory), alternated in one process
(offload.bench.measure), on the zoo MLPs' layer shapes; then the whole models with the fusion,
without it, and onnxruntime.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bench_dense_chain.py
    ... --batch 16000 --threads 2 --blocks 0,24,48,96,192   (block sizes to compare; 0: auto)
"""

from __future__ import annotations

import argparse
import contextlib

import numpy as np

import offload
from offload import _core, bench, zoo
from offload.drivers import cpu

SHAPES = {"jet_mlp": [16, 64, 32, 32, 5], "hcal_mlp": [47, 200, 100, 50, 20, 10, 5, 1]}


def _layers(dims, rng):
    """Weights, biases and activation codes of an MLP (ReLU between layers, none at the end)."""
    ws = [(rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
          for k, n in zip(dims, dims[1:])]
    bs = [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in dims[1:]]
    acts = [1] * (len(ws) - 1) + [0]
    return ws, bs, acts


def kernels(name, dims, batch, blocks, repeats, min_time):
    rng = np.random.default_rng(0)
    ws, bs, acts = _layers(dims, rng)
    wps = [cpu.pack_columns(w) for w in ws]
    x = rng.standard_normal((batch, dims[0])).astype(np.float32)
    outs = [np.empty((batch, n), np.float32) for n in dims[1:]]

    def layer(i):
        src = x if i == 0 else outs[i - 1]
        return lambda _: _core.dense_packed(src, wps[i], bs[i], None, outs[i], acts[i], 0., 0., 0.)

    def layers(_):
        for i in range(len(ws)):
            _core.dense_packed(x if i == 0 else outs[i - 1], wps[i], bs[i], None, outs[i],
                               acts[i], 0., 0., 0.)

    y = np.empty((batch, dims[-1]), np.float32)
    n = len(ws)
    contenders = [bench.Contender("layers (dense_packed x %d)" % n, layers)]
    chains = {}
    for b in blocks:
        chains[b] = _core.DenseChain(x, wps, bs, y, acts, [0.] * n, [0.] * n, [0.] * n, b)
        contenders.append(bench.Contender(f"chain (block {chains[b].block_rows}"
                                          f"{', auto' if b == 0 else ''})",
                                          lambda _, c=chains[b]: c.run()))
    contenders += [bench.Contender(f"  layer {i + 1} alone ({k}->{m})", layer(i))
                   for i, (k, m) in enumerate(zip(dims, dims[1:]))]
    layers(None)
    want = outs[-1].copy()
    for c in chains.values():
        c.run()
        np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-5)
    res = bench.measure(contenders, None, repeats=repeats, min_time_s=min_time, pause_s=0.05)
    base = res[contenders[0].name].median_s
    print(f"\n{name} b{batch}, {_core.get_num_threads()} threads: kernels alone")
    for c in contenders:
        m = res[c.name].median_s
        print(f"  {c.name:32s} {m * 1e3:8.3f} ms  {m / base:5.2f}x of the layers")


@contextlib.contextmanager
def _unfused():
    """Plans made inside do not fuse dense chains (the builder stops advertising it)."""
    op = cpu.OPS["dense"]
    saved = op.fused_chain
    del op.fused_chain
    try:
        yield
    finally:
        op.fused_chain = saved


def models(name, batch, repeats, min_time):
    path = zoo.path(name)
    x = zoo.sample_input(name, batch)
    fused = offload.load(path, device="cpu")
    with _unfused():
        unfused = offload.load(path, device="cpu")
        unfused(x)  # (the plan is made here)
    fused(x)
    # (the plan the call ran: batch 16000 runs on the 16384-row plan of its bucket)
    steps = lambda m: [s.node.name for s in m._plans.values()[0][0].steps]  # noqa: E731
    assert steps(fused) != steps(unfused), f"the fusion did not apply: {steps(fused)}"
    contenders = [bench.Contender("offload, layers unfused", lambda a: unfused(a)),
                  bench.Contender("offload, fused chain", lambda a: fused(a))]
    ort = bench.onnxruntime_contender(path)
    if ort is not None:
        contenders.append(ort)
    res = bench.measure(contenders, x, repeats=repeats, min_time_s=min_time)
    ref = res[contenders[-1].name].median_s
    print(f"\n{name} b{batch}: whole model (fused steps: {steps(fused)})")
    for c in contenders:
        m = res[c.name].median_s
        print(f"  {c.name:32s} {m * 1e3:8.3f} ms  {m / ref:5.2f}x of {contenders[-1].name}")


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=16000)
    p.add_argument("--threads", type=int, default=0, help="0: the cpu device's default")
    p.add_argument("--blocks", default="0", help="block_rows values of the chain to compare")
    p.add_argument("--models", default="jet_mlp,hcal_mlp")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--min-time", type=float, default=1.0)
    p.add_argument("--no-models", action="store_true", help="the kernels only")
    a = p.parse_args()
    if a.threads:
        offload.set_num_threads(a.threads)
    else:
        cpu.get_num_threads()
    blocks = [int(b) for b in a.blocks.split(",")]
    for name in a.models.split(","):
        kernels(name, SHAPES[name], a.batch, blocks, a.repeats, a.min_time)
        if not a.no_models:
            models(name, a.batch, a.repeats, a.min_time)


if __name__ == "__main__":
    main()
