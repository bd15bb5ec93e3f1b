"""Lower a LoRA's rank by SVD, to a fixed rank or per module to keep a fraction of the energy, and write it in the
kohya layout with alphas that keep alpha/rank, so strength 1 stays (nearly) the same function."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from sdlora import families
from sdlora.adapters.lora import LORA
from sdlora.errors import UserError
from sdlora.info import read_adapter
from sdlora.lora import save_lora

# A hash of the old bytes would be wrong for the new file (docs/lora-format.md, Cover image and hash).
_STALE_METADATA = ("sshs_model_hash", "sshs_legacy_hash", "lora_adapter_metadata")


@torch.no_grad()
def resize(path: str | Path, out: str | Path, rank: int | None = None, energy: float | None = None) -> list[dict]:
    """Write `path` at a lower rank to `out`. `rank`: the new rank (a cap, with `energy`); `energy`: per module, the
    smallest rank whose singular values keep this fraction of the squared Frobenius norm of alpha/r * up @ down.

    With R the largest new rank, every module gets alpha' = (alpha/r) * R (so alpha'/R keeps the trained alpha/rank,
    as kohya's resize does) and up' = c U_k sqrt(S_k), down' = c sqrt(S_k) V_k^T with c^2 = k / R, so that
    (alpha'/k) up' down' is the best rank-k approximation of (alpha/r) up down (Eckart-Young). A file whose modules
    have different alpha/rank gets the most common one, the rest folded into the weights.
    Returns one row per module: name, rank, new_rank, alpha, new_alpha, rel_error (Frobenius, of the update).
    """
    if rank is None and energy is None:
        raise UserError("give --rank R or --energy F", "e.g. sdlora resize lora.safetensors --rank 8 --out small.safetensors")
    if rank is not None and rank < 1:
        raise UserError(f"--rank must be at least 1, got {rank}", "pick a rank such as 4, 8 or 16")
    if energy is not None and not 0 < energy <= 1:
        raise UserError(f"--energy must be in (0, 1], got {energy}", "0.9 keeps 90% of each module's energy")
    adapter = read_adapter(path)
    if adapter.kind is not LORA:
        # a Hadamard or Kronecker product has no SVD-truncation to a lower rank that keeps its file layout
        raise UserError(f"{Path(path).name} is a LyCORIS {adapter.kind.name} file, which "
                        "cannot be resized: resize reduces the rank of LoRA, LoCon and DoRA files (up @ down)",
                        f"train it again with a lower --rank, or merge it into the base (sdlora merge BASE "
                        f"{Path(path).name})")
    if adapter.stray:
        raise UserError(f"{Path(path).name} has {len(adapter.stray)} keys outside any LoRA module, e.g. {adapter.stray[0]}",
                        "`sdlora info` lists them; only clean LoRA files can be resized")
    plans = {}
    for name, (down, up, alpha, *_) in sorted(adapter.modules.items()):
        r = down.shape[0]
        # SVD of up @ down through QR of the thin factors: exact, and O((out + in) r^2) instead of a full SVD
        qu, ru = torch.linalg.qr(up.flatten(1).double())
        qd, rd = torch.linalg.qr(down.flatten(1).double().T)
        um, s, vmh = torch.linalg.svd(ru @ rd.T)
        total = float((s ** 2).sum())
        k = r
        if energy is not None and total > 0:
            k = int((torch.cumsum(s ** 2, 0) / total < energy - 1e-12).sum()) + 1
        plans[name] = (qu @ um, s, vmh @ qd.T, max(1, min(k, rank or r, r, len(s))), total)
    top = max(k for _, _, _, k, _ in plans.values())
    # One alpha for the whole file, not kohya's alpha*k/r per module: diffusers 0.42 gives every module the most
    # common alpha when alphas differ, so each module's own factor goes into its weights instead.
    ratio = Counter(w[2] / w[0].shape[0] for w in adapter.modules.values()).most_common(1)[0][0] or 1.0
    new_alpha = ratio * top  # alpha/rank of the file's full-rank modules = the trained alpha/rank
    state, rows = {}, []
    for name, (u, s, vh, k, total) in plans.items():
        down, up, alpha, *dora = adapter.modules[name]
        r = down.shape[0]
        if dora:
            # DoRA: W' = m * (W + dW) / |W + dW|. The magnitude m is kept as trained and the reader renormalises, so
            # only the direction's change dW is approximated; rel_error is that of dW, not of W' (which needs the base)
            state[f"{name}.dora_scale"] = dora[0]
        root = (s[:k] * (alpha / r) / ratio * k / top).sqrt()  # (new_alpha/k) up' down' = (alpha/r) U_k S_k V_k^T
        new_up = (u[:, :k] * root).reshape(up.shape[0], k, *up.shape[2:])
        new_down = (root[:, None] * vh[:k]).reshape(k, *down.shape[1:])
        state[f"{name}.lora_down.weight"] = new_down.to(down.dtype).contiguous()
        state[f"{name}.lora_up.weight"] = new_up.to(up.dtype).contiguous()
        state[f"{name}.alpha"] = torch.tensor(new_alpha, dtype=torch.float32)
        rel = (float((s[k:] ** 2).sum()) / total) ** 0.5 if total > 0 else 0.0
        rows.append({"name": name, "rank": r, "new_rank": k, "alpha": alpha, "new_alpha": new_alpha, "rel_error": rel})
    meta = {k: v for k, v in adapter.metadata.items() if k not in _STALE_METADATA}
    new_ranks = {row["new_rank"] for row in rows}
    # kohya's resize_lora.py writes "Dynamic" when the ranks differ per module
    meta["ss_network_dim"] = str(new_ranks.pop()) if len(new_ranks) == 1 else "Dynamic"
    meta["ss_network_alpha"] = str(new_alpha)
    meta["sdlora_resize"] = json.dumps({"from": Path(path).name, "rank": rank, "energy": energy,
                                        "max_rel_error": max(row["rel_error"] for row in rows)})
    meta.setdefault("ss_network_module", "networks.lora")
    family = families.stated(adapter.metadata) or families.from_lora_names(adapter.modules)
    if family is not None and adapter.layout == "diffusers":
        state = family.file_state_dict(state)  # SD3.5's own files: back into diffusers' layout, alpha folded
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_lora(out, state, meta)
    return rows


def format_rows(rows: list[dict], limit: int = 0) -> str:
    """Per-module lines (worst first; `limit` 0 = all) and a summary line."""
    worst = sorted(rows, key=lambda r: r["rel_error"], reverse=True)
    lines = [f"{r['rel_error']:8.2%}  rank {r['rank']:>3} -> {r['new_rank']:<3} "
             f"alpha {r['alpha']:g} -> {r['new_alpha']:g}  {r['name']}" for r in (worst[:limit] if limit else worst)]
    if limit and len(rows) > limit:
        lines.append(f"... {len(rows) - limit} more modules")
    errors = [r["rel_error"] for r in rows]
    before, after = sum(r["rank"] for r in rows), sum(r["new_rank"] for r in rows)
    lines.append(f"{len(rows)} modules, total rank {before} -> {after}; relative error mean {sum(errors) / len(errors):.2%}, "
                 f"max {max(errors):.2%}")
    return "\n".join(lines)
