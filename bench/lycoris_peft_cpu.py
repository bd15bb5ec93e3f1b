"""LoHa and LoKr trained by peft's layers (what sdlora uses) and by the lycoris package, side by side on the tiny
model on a CPU: time per training step, the process's peak memory, and how faithfully the written file gives back
the trained model's change.

    PYTHONPATH=. python bench/lycoris_peft_cpu.py            # both algorithms, both libraries, one process each

Each variant adapts the same UNet layers (attention, and the ResNet blocks' layers with conv rank/alpha) at the same
rank and alpha, trains `--steps` AdamW steps on random latents (batch 2, the same seed), then writes its file: peft's
through sdlora's writer (sdlora.adapters.lycoris), lycoris's through its own `save_weights`. The file is read back by
LyCORIS's formulas (tests/test_lycoris.py, `lycoris_delta`) and each module's change is compared with what the trained
layer adds to its weight (peft's get_delta_weight, lycoris's get_weight times its scalar): the largest difference
relative to the module's largest change, worst module. The two CPU cores this ran on are shared: run it twice.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
RANK, ALPHA, CONV_RANK, CONV_ALPHA = 8, 4.0, 4, 2.0


def _targets(unet):
    """(module path, is a 3x3 convolution) of the layers sdlora's LoHa/LoKr adapt (sdlora.families.targets)."""
    from sdlora.families.targets import UNET_CONV3X3_TARGETS, UNET_CONV_OTHER_TARGETS

    found = []
    for path, m in unet.named_modules():
        if not isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if any(path == t or path.endswith("." + t) for t in ATTN + UNET_CONV_OTHER_TARGETS):
            found.append((path, False))
        elif any(path == t or path.endswith("." + t) for t in UNET_CONV3X3_TARGETS):
            found.append((path, True))
    return found


def run_one(library: str, algo: str, steps: int, out: Path) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from sdlora.models import load_base

    torch.manual_seed(0)
    torch.set_num_threads(2)
    unet = load_base("tiny").pipe.unet
    unet.requires_grad_(False)
    targets = _targets(unet)
    bases = {p: m for p, m in unet.named_modules()}
    if library == "peft":
        from sdlora import adapters
        from sdlora.families.targets import UNET_CONV3X3_TARGETS, UNET_CONV_OTHER_TARGETS

        adapter = adapters.get(algo)
        params = adapter.attach(unet, ATTN + UNET_CONV_OTHER_TARGETS, rank=RANK, alpha=ALPHA,
                                conv_targets=UNET_CONV3X3_TARGETS, conv_rank=CONV_RANK, conv_alpha=CONV_ALPHA)
        layers = adapter.layers(unet)
    else:
        from lycoris import LycorisNetwork, create_lycoris

        # kohya's key prefix, and exactly sdlora's layers
        LycorisNetwork.apply_preset({"target_module": [], "lora_prefix": "lora_unet", "enable_conv": True,
                                     "target_name": [re.escape(p) + "$" for p, _ in targets]})
        network = create_lycoris(unet, 1.0, linear_dim=RANK, linear_alpha=ALPHA, algo=algo, conv_dim=CONV_RANK,
                                 conv_alpha=CONV_ALPHA)
        network.apply_to()
        params = list(network.parameters())
        for p in params:
            p.requires_grad_(True)
        layers = {m.lora_name: m for m in network.loras}
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    hidden = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    times = []
    for step in range(steps):
        noise = torch.randn(latents.shape, generator=g)
        t = torch.randint(0, 1000, (2,), generator=g)
        start = time.perf_counter()
        pred = unet(latents + noise, t, hidden).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    path = out / f"{library}-{algo}.safetensors"
    if library == "peft":
        from sdlora.lora import kohya_modules, kohya_state_dict, save_lora

        save_lora(path, kohya_state_dict(unet, {}, adapter=adapter), {})
        named = kohya_modules(unet, {}, adapter=adapter)

        def trained(name):  # the change peft's layer adds to its weight at strength 1
            return named[name].get_delta_weight("default")
    else:
        network.save_weights(str(path), torch.float32, {})

        def trained(name):  # the change lycoris's forward adds (get_weight times its scalar)
            module = layers[name]
            return module.get_weight(module.shape) * module.scalar

    from safetensors.torch import load_file
    from test_lycoris import lycoris_delta

    state = load_file(str(path))
    names = sorted({k.split(".")[0] for k in state})
    worst = 0.0
    with torch.no_grad():
        for name in names:
            path_ = next(p for p, _ in targets if "lora_unet_" + p.replace(".", "_") == name)
            base = bases[path_].get_base_layer() if hasattr(bases[path_], "get_base_layer") else bases[path_]
            wanted = trained(name).reshape(base.weight.shape).float()
            delta = lycoris_delta(state, name, base.weight)
            worst = max(worst, float((delta - wanted).abs().max() / wanted.abs().max().clamp_min(1e-12)))
    body = sorted(times[2:]) or times
    return {"library": library, "algo": algo, "modules": len(names), "keys": len(state),
            "params": sum(p.numel() for p in params), "step_ms_median": round(1000 * body[len(body) // 2], 1),
            "peak_rss_mib": round(peak_mib), "file_vs_trained_max_rel": worst,
            "file_kib": round(path.stat().st_size / 1024)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", default="/tmp/sdlora-lycoris-bench")
    ap.add_argument("--one", nargs=2, metavar=("LIBRARY", "ALGO"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.one:
        print(json.dumps(run_one(*args.one, args.steps, out)))
        return
    for algo in ("loha", "lokr"):
        for library in ("peft", "lycoris"):  # one process each: peak memory is the process's own
            res = subprocess.run([sys.executable, __file__, "--one", library, algo, "--steps", str(args.steps),
                                  "--out", str(out)], capture_output=True, text=True)
            line = res.stdout.strip().splitlines()[-1] if res.returncode == 0 else res.stderr.strip()[-2000:]
            print(line, flush=True)
        # the layout itself: sdlora's file from peft against lycoris's own, key for key
        from safetensors.torch import load_file

        ours, theirs = (load_file(str(out / f"{lib}-{algo}.safetensors")) for lib in ("peft", "lycoris"))
        same = set(ours) == set(theirs) and all(
            ours[k].shape == theirs[k].shape and ours[k].dtype == theirs[k].dtype for k in ours) and all(
            float(ours[k]) == float(theirs[k]) for k in ours if k.endswith(".alpha"))
        print(json.dumps({"algo": algo, "same_keys_shapes_dtypes_alphas": same}), flush=True)


if __name__ == "__main__":
    main()
