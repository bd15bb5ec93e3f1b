"""One adapted layer's forward + backward, peft's way and sdlora's, for the adapter types whose layer sdlora computes
differently: LoKr (peft forms kron(w1, w2) and runs a second full-size matmul; sdlora applies w1 X w2^T to the input
reshaped to c x d, sdlora/adapters/lycoris.py), LoHa (peft forms (w1_a w1_b) * (w2_a w2_b); sdlora applies its r^2
rank-one parts, V then U, to layers wider than 2 r^2) and DoRA (peft forms BA and W + BA for its norms every step and
rescales the base layer's output and the LoRA's; sdlora takes the norms from W's row norms and one rank-r matmul and
folds the rescaling into the weight, sdlora/adapters/dora.py).

    python bench/layer_forward.py [--types lokr loha dora] [--ranks 16] [--layers linear conv] [--tokens 8192]
                                  [--dims 320 640 1280] [--conv-dims 320 640] [--repeats 20] [--json results.json]

Prints ms per forward + backward (median of --repeats) for each type, kind of layer (Linear, 3x3 convolution) and
width (in = out), and a plain LoRA (LoCon) layer's on the same base (the floor), under bf16 autocast with a bf16
base on a GPU, fp32 on the CPU; --json also writes them with the machine and versions (on a GPU with each
one's peak memory above the layers and the input).
"""

import argparse
import itertools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


TYPES = ("lokr", "loha", "dora")


def _layer(kind: str, dim: int, rank: int, device: str, conv: bool, own: bool = True):
    """(trainable parameters, layer) of adapter type `kind` ("lora": the floor) on a dim x dim Linear layer or 3x3
    convolution; `own`: sdlora's forward, else peft's (sdlora's replacements taken off the layer)."""
    from sdlora import adapters

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(dim, dim, 3, padding=1) if conv else torch.nn.Linear(dim, dim))
    model.to(device, torch.bfloat16 if device == "cuda" else torch.float32)  # a bf16 base, as a GPU trains
    where = {"targets": [], "conv_targets": ["0"]} if conv else {"targets": ["0"]}
    params = adapters.get(kind).attach(model, rank=rank, alpha=rank / 2, conv_rank=rank, conv_alpha=rank / 2, **where)
    if not own:
        for module in model.modules():
            for name in ("forward", "_get_delta_activations"):
                module.__dict__.pop(name, None)
    return params, model[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES)
    ap.add_argument("--layers", nargs="+", default=["linear", "conv"], choices=("linear", "conv"),
                    help="Linear layers, and 3x3 convolutions on 32 x 32 pictures (--tokens pixels)")
    ap.add_argument("--tokens", type=int, default=8192, help="rows of the input (batch x sequence)")
    ap.add_argument("--dims", type=int, nargs="+", default=[320, 640, 1280], help="Linear layers' widths (in = out)")
    ap.add_argument("--conv-dims", type=int, nargs="+", default=[320, 640], help="convolutions' widths")
    ap.add_argument("--ranks", type=int, nargs="+", default=[16], help="each type at each of these ranks")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    print(f"{args.tokens} tokens, {torch.cuda.get_device_name() if cuda else 'cpu'}, "
          f"torch {torch.__version__}, {'bf16 autocast' if cuda else 'fp32'}")
    rows = []
    print("| layer | type | rank | width | peft ms | sdlora ms | speed-up | LoRA ms |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, rank, layers in itertools.product(args.types, args.ranks, args.layers):
        for dim in (args.conv_dims if layers == "conv" else args.dims):
            conv = layers == "conv"
            params, layer = _layer(kind, dim, rank, args.device, conv)
            peft_params, peft = _layer(kind, dim, rank, args.device, conv, own=False)
            for p, q in zip(params, peft_params):
                p.data.normal_(0, 0.02)
                q.data.copy_(p.data)
            shape = (args.tokens // 1024, dim, 32, 32) if conv else (args.tokens, dim)
            x = torch.randn(*shape, device=args.device, requires_grad=True)
            times, peaks = {}, {}
            for name, fn in (("peft", peft), ("sdlora", layer),
                             ("lora", _layer("lora", dim, rank, args.device, conv)[1])):
                runs = []
                if cuda:
                    x.grad = None
                    torch.cuda.reset_peak_memory_stats()
                    held = torch.cuda.memory_allocated()
                for i in range(args.repeats + 3):
                    if cuda:
                        torch.cuda.synchronize()
                    t = time.perf_counter()
                    with torch.autocast(args.device, dtype=torch.bfloat16, enabled=cuda):
                        y = fn(x)
                    y.float().square().mean().backward()
                    if cuda:
                        torch.cuda.synchronize()
                    if i >= 3:
                        runs.append((time.perf_counter() - t) * 1e3)
                times[name] = statistics.median(runs)
                if cuda:  # what one forward and backward adds, above the layers and the input
                    peaks[f"{name}_peak_mib"] = round((torch.cuda.max_memory_allocated() - held) / 2**20, 1)
            print(f"| {layers} | {kind} | {rank} | {dim} | {times['peft']:.2f} | {times['sdlora']:.2f} | "
                  f"{times['peft'] / times['sdlora']:.2f}x | {times['lora']:.2f} |")
            rows.append({"layer": layers, "type": kind, "rank": rank, "width": dim,
                         **{f"{name}_ms": round(ms, 3) for name, ms in times.items()}, **peaks})
    if args.json:
        import peft

        machine = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()}, " \
            f"{torch.get_num_threads()} threads"
        Path(args.json).write_text(json.dumps({
            "command": "python bench/layer_forward.py " + " ".join(sys.argv[1:]), "machine": machine,
            "torch": torch.__version__, "peft": peft.__version__, "precision": "bf16 autocast" if cuda else "fp32",
            "conv": "3x3, 32 x 32 pictures", "tokens": args.tokens, "repeats": args.repeats,
            "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
