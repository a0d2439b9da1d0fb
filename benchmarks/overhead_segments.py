"""Where the time outside the network goes in a fixed-step ODE sampler: the Euler update, op by op.

``overhead.py`` finds that sdediff's Euler spends about 150 µs per NFE outside the network inside a real
run, against ~70 µs with a free network. This script times the operations of that update (the ones
``Euler.step`` and ``integrate`` make for a linear SDE: ``out = a x`` into a reused buffer, ``out += b s``, the
per-step finiteness record, and for comparison the whole-state sum that record used to be) with the
benchmark's MLP, each right after the network call that precedes it in the loop
("cold") and the same operation repeated at once on the same tensors ("warm"), in thread CPU time. The
difference is the cost of reading the state back after the network's 3 MB of weights have flushed the
caches. It also times the same update written in place on the state (``x *= a; x += b s``), which reads and
writes the state once.

    python benchmarks/overhead_segments.py    # ~10 s; writes benchmarks/results/overhead_segments.{md,json}
"""

from __future__ import annotations

import json
import statistics
import time

import overhead  # a sibling script (benchmarks/README.md)
import torch

from sdediff._io import atomic_write


def main() -> int:
    device, env = overhead.common.setup_torch("cpu")
    bench = overhead.Bench(device)
    net, x_T = bench.net, bench.x_T
    t, b = torch.full((x_T.shape[0],), 0.5), torch.tensor(-0.01)
    clock = time.thread_time_ns
    record = torch.empty(x_T.shape[0])

    def update(x, s, out):
        return torch.mul(x, 0.99, out=out).addcmul_(b, s)

    ops = {  # name -> (untimed work after the network call, the timed operation)
        "update (mul into buffer, addcmul_)": (None, update),
        "sum of the new state (the former per-step finiteness record)": (update, lambda x, s, out: torch.sum(out, (0, 1, 2, 3))),
        "copy of every sample's first element (the per-step finiteness record)":
            (update, lambda x, s, out: record.copy_(out[:, 0, 0, 0])),
        "update in place on x (mul_, addcmul_)": (None, lambda x, s, out: x.mul_(0.99).addcmul_(b, s)),
    }
    rows = []
    with torch.inference_mode():
        for name, (before, op) in ops.items():
            cold, warm = [], []
            for _ in range(12):
                x, out = x_T.clone(), torch.empty_like(x_T)
                for _ in range(20):
                    s = net(x, t)  # flushes the caches as in a sampling loop
                    if before is not None:
                        before(x, s, out)
                    c0 = clock()
                    op(x, s, out)
                    c1 = clock()
                    op(x, s, out)  # at once again: the tensors are in cache
                    cold.append(c1 - c0)
                    warm.append(clock() - c1)
            rows.append({"op": name, "cold_us": statistics.median(cold) / 1e3, "warm_us": statistics.median(warm) / 1e3})
    t_call = 1e6 * bench.t_call(50)[1]
    lines = ["# Euler's update, op by op, after the network call", "",
             f"{env}. Network: the MLP of `overhead.py` (3x32x32, batch 64, hidden 256), one call {t_call:.0f} µs CPU; "
             "state 786 KB (float32). Median thread CPU time over 240 steps.", "",
             "| operation | right after the network (µs) | repeated at once (µs) | cold − warm (µs) | cold / t_call |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['op']} | {r['cold_us']:.1f} | {r['warm_us']:.1f} | {r['cold_us'] - r['warm_us']:.1f} | "
              f"{r['cold_us'] / t_call:.3f} |" for r in rows]
    text = "\n".join(lines)
    out_dir = overhead.common.RESULTS_DIR
    atomic_write(out_dir / "overhead_segments.md", text + "\n")
    atomic_write(out_dir / "overhead_segments.json", json.dumps({"environment": env, "t_call_us": t_call, "rows": rows},
                                                                 indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
