"""LoKr's change to a Linear layer's output, two ways: peft's (form kron(w1, w2), then a second full-size matmul) and
sdlora's (w1 X w2^T on the input reshaped to c x d, sdlora/adapters/lycoris.py); forward + backward, one layer.

    python bench/lokr_forward.py [--tokens 8192] [--dims 320 640 1280] [--repeats 20] [--device cuda]

Prints ms per forward + backward (median of --repeats) for each layer width, under bf16 autocast on a GPU, fp32 on
the CPU.
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    from peft.tuners.lokr import Linear as LoKrLinear

    from sdlora.adapters.lycoris import ADAPTER, LoKr

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=8192, help="rows of the input (batch x sequence)")
    ap.add_argument("--dims", type=int, nargs="+", default=[320, 640, 1280], help="layer widths (in = out)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    print(f"{args.tokens} tokens, rank {args.rank}, {torch.cuda.get_device_name() if cuda else 'cpu'}, "
          f"torch {torch.__version__}, {'bf16 autocast' if cuda else 'fp32'}")
    print("| width | factors w1, w2 | formed product (peft) ms | reshaped input (sdlora) ms | speed-up |")
    print("|---|---|---|---|---|")
    for dim in args.dims:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(dim, dim)).to(args.device)
        params = LoKr().attach(model, ["0"], rank=args.rank, alpha=args.rank / 2)
        for p in params:
            p.data.normal_(0, 0.02)
        layer = model[0]
        x = torch.randn(args.tokens, dim, device=args.device, requires_grad=True)

        def fast():
            return layer(x)

        def formed():
            return layer.base_layer(x) + LoKrLinear._get_delta_activations(layer, ADAPTER, x)

        times = {}
        for name, fn in (("formed", formed), ("fast", fast)):
            runs = []
            for i in range(args.repeats + 3):
                if cuda:
                    torch.cuda.synchronize()
                t = time.perf_counter()
                with torch.autocast(args.device, dtype=torch.bfloat16, enabled=cuda):
                    y = fn()
                y.float().square().mean().backward()
                if cuda:
                    torch.cuda.synchronize()
                if i >= 3:
                    runs.append((time.perf_counter() - t) * 1e3)
            times[name] = statistics.median(runs)
        shapes = " ".join("x".join(map(str, p.shape)) for p in params)
        print(f"| {dim} | {shapes} | {times['formed']:.2f} | {times['fast']:.2f} | "
              f"{times['formed'] / times['fast']:.2f}x |")


if __name__ == "__main__":
    main()
