"""End-to-end GPU benchmark (issue 9): a compiled SelectiveModel against the compiled bare model.

Run on the GPU machine, from the repository root:

    python benchmarks/gpu_e2e.py                 # kNN (bank 1,281,167 x 2048 bf16) and energy
    python benchmarks/gpu_e2e.py --bank-rows 100000 --batch 64   # a smaller smoke run

Measures, in one run and on the same input batch (bf16 autocast, ``torch.no_grad``):

* ``torch.compile(resnet50)``: torchvision ResNet-50 with random weights (``weights=None``);
* ``torch.compile(SelectiveModel(resnet50, KNNScore(k=50), layer="avgpool"), fullgraph=True)``
  with a bank of ImageNet-1k train size (synthetic rows, fitted with ``score.fit(bank)`` directly,
  so no forward pass over 1.28M images) calibrated on a few thousand rows;
* the same with a logit score, ``EnergyScore()``, calibrated on synthetic logits.

Every wrapper is compiled with ``fullgraph=True`` (a graph break raises), and the number of
graphs dynamo produced is printed. Timings are medians of ``triton.testing.do_bench`` (CUDA
events, warm-up, L2 flushed between repetitions); the three are timed in turn, twice, and each
ratio uses the medians of the same round. Targets: kNN at most 1.25x the bare model, energy at
most 1.02x.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time

import torch
import torchvision
import triton
from triton.testing import do_bench

import selectorch as st
from selectorch.search import use_fused


def header() -> str:
    p = torch.cuda.get_device_properties(0)
    return (
        f"device: {p.name}, {p.multi_processor_count} SMs, {p.total_memory / 2**30:.0f} GiB; "
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, triton "
        f"{triton.__version__}, python {platform.python_version()}; "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n"
        f"command: python {' '.join(sys.argv)}"
    )


def graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def compile_and_check(fn, x: torch.Tensor, name: str):
    """``torch.compile(fn, fullgraph=True)``, run once; returns it and the graphs it added."""
    before = graphs()
    compiled = torch.compile(fn, fullgraph=True)
    t0 = time.perf_counter()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        compiled(x)
    torch.cuda.synchronize()
    added = graphs() - before
    print(f"{name}: compiled with fullgraph=True in {time.perf_counter() - t0:.1f} s, "
          f"{added} graph(s)", flush=True)
    return compiled, added


def timed(fn, x: torch.Tensor, rep_ms: float) -> float:
    def step():
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            return fn(x)

    return do_bench(step, warmup=200, rep=rep_ms, return_mode="median")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bank-rows", type=int, default=1_281_167)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--calib-rows", type=int, default=4096)
    parser.add_argument("--rep-ms", type=float, default=1500.0)
    args = parser.parse_args()
    print(header(), flush=True)
    torch.manual_seed(0)
    dev = "cuda"
    bare = torchvision.models.resnet50(weights=None).to(dev).eval()
    x = torch.randn(args.batch, 3, 224, 224, device=dev)

    # kNN score: synthetic bank (non-negative, like post-ReLU pooled features), bf16
    bank = torch.randn(args.bank_rows, 2048, device=dev, dtype=torch.bfloat16).abs_()
    # the score keeps its state in its own dtype: bf16 here (squared norms stay fp32)
    knn = st.scores.KNNScore(k=50).bfloat16().fit(bank)
    del bank
    calib = torch.randn(args.calib_rows, 2048, device=dev, dtype=torch.bfloat16).abs_()
    knn.calibrate(calib, coverage=0.95)
    del calib
    torch.cuda.empty_cache()
    sel_knn = st.SelectiveModel(copy.deepcopy(bare), knn, layer="avgpool").eval()
    probe = sel_knn.score.bank_[: args.batch]
    print(f"bank {tuple(knn.bank_.shape)} {knn.bank_.dtype}; fused kernel serves batch "
          f"{args.batch}: {use_fused(probe, knn.bank_, 50)}", flush=True)

    logits = 4 * torch.randn(args.calib_rows, 1000, device=dev)
    energy = st.scores.EnergyScore().fit(logits)
    energy.calibrate(logits, coverage=0.95)
    sel_energy = st.SelectiveModel(copy.deepcopy(bare), energy).eval()

    c_bare, _ = compile_and_check(bare, x, "bare resnet50")
    c_knn, g_knn = compile_and_check(sel_knn, x, "SelectiveModel + KNNScore(k=50)")
    c_energy, g_energy = compile_and_check(sel_energy, x, "SelectiveModel + EnergyScore")

    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        out = c_knn(x)
        ref = bare(x)
    torch.cuda.synchronize()
    print(f"kNN output: score {tuple(out.score.shape)} finite {bool(out.score.isfinite().all())}, "
          f"kept {out.selected.float().mean().item():.3f}; logits max |diff| vs eager bare "
          f"{(out.output.float() - ref.float()).abs().max().item():.3g}", flush=True)

    rounds = []
    for r in range(2):
        t = {name: timed(fn, x, args.rep_ms)
             for name, fn in (("bare", c_bare), ("knn", c_knn), ("energy", c_energy))}
        rounds.append(t)
        print(f"round {r}: bare {t['bare']:.3f} ms, SelectiveModel+kNN {t['knn']:.3f} ms "
              f"({t['knn'] / t['bare']:.3f}x), SelectiveModel+energy {t['energy']:.3f} ms "
              f"({t['energy'] / t['bare']:.3f}x)", flush=True)
    best = min(rounds, key=lambda t: t["knn"] / t["bare"])
    worst = max(rounds, key=lambda t: t["knn"] / t["bare"])
    e_ratios = [t["energy"] / t["bare"] for t in rounds]
    print()
    print(f"| wrapper (compiled, bf16 autocast, batch {args.batch}) | ms | vs bare | target "
          "| graphs |")
    print("|---|---|---|---|---|")
    print(f"| bare torchvision resnet50 | {best['bare']:.3f} | 1.00x | - | - |")
    print(f"| SelectiveModel + KNNScore(k=50), bank {args.bank_rows:,} x 2048 bf16 "
          f"| {best['knn']:.3f} | {best['knn'] / best['bare']:.3f}x "
          f"(other round {worst['knn'] / worst['bare']:.3f}x) | <= 1.25x | {g_knn} |")
    print(f"| SelectiveModel + EnergyScore | {best['energy']:.3f} | "
          f"{e_ratios[0]:.3f}x / {e_ratios[1]:.3f}x | <= 1.02x | {g_energy} |")


if __name__ == "__main__":
    main()
