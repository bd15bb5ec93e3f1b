"""Where a `sdlora train` process spends its first seconds: Python, imports by package, the CUDA driver and context.

Each measurement is a fresh process, as a run is. Run on the GPU machine:

    python bench/startup.py --out startup.json [--repeats 2]
    PYTHONPATH=/tmp/clean:$PWD python -S bench/startup.py --out clean.json   # in a bench/clean_env.py folder
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import time
from collections import Counter

# each snippet prints "name seconds" lines for its own stages; the process's wall time is measured from outside
SNIPPETS = {
    "python": "pass",
    "import torch": "import torch",
    "torch + CUDA": """
import time; t = time.perf_counter()
import torch; a = time.perf_counter(); print("import_torch", a - t)
torch.cuda.init(); b = time.perf_counter(); print("cuda_init", b - a)
torch.zeros(1, device="cuda"); c = time.perf_counter(); print("first_tensor", c - b)
torch.ones(64, 64, device="cuda") @ torch.ones(64, 64, device="cuda"); torch.cuda.synchronize()
print("first_matmul", time.perf_counter() - c)
""",
    # what `sdlora train` does before its first stage
    "sdlora.train, then CUDA": """
import time; t = time.perf_counter()
import sdlora.train, torch; a = time.perf_counter(); print("imports", a - t)
torch.zeros(1, device="cuda"); print("cuda_ready", time.perf_counter() - a)
""",
}


def run(code: str, importtime: bool = False) -> dict:
    # -S passes on: run under `python -S` with a bench/clean_env.py folder, every process sees only that
    args = [sys.executable, *(["-S"] if sys.flags.no_site else []), *(["-X", "importtime"] if importtime else []),
            "-c", code]
    t = time.perf_counter()
    proc = subprocess.run(args, capture_output=True, text=True)
    out = {"wall_s": time.perf_counter() - t, "returncode": proc.returncode}
    for line in proc.stdout.splitlines():
        name, _, value = line.partition(" ")
        out[name] = float(value)
    if proc.returncode:
        out["stderr"] = proc.stderr[-2000:]
    if importtime:
        out["imports"] = summarize(proc.stderr)
    return out


def summarize(log: str, top: int = 25) -> dict:
    """Self time by top-level package, and the slowest imports (cumulative) with the chain that pulled each in."""
    rows = []
    for line in log.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
        if m:
            rows.append((int(m[1]) / 1e6, int(m[2]) / 1e6, len(m[3]) // 2, m[4]))
    by_package = Counter()
    for self_s, _, _, name in rows:
        by_package[name.split(".")[0]] += self_s
    chains = []
    for i, (_, cum, depth, name) in enumerate(rows):  # a module is listed after everything it imported
        chain, d = [name], depth
        for _, _, d2, n2 in rows[i + 1:]:
            if d2 < d:
                chain.append(n2)
                d = d2
        chains.append((cum, " <- ".join(chain[:8])))
    chains.sort(reverse=True)
    return {"total_self_s": sum(r[0] for r in rows), "modules": len(rows),
            "by_package_s": dict(by_package.most_common(top)),
            "slowest": [{"s": round(c, 3), "chain": ch} for c, ch in chains[:top * 2]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    results = {"python": sys.version, "site": not sys.flags.no_site, "path": sys.path, "runs": {}}
    for name, code in SNIPPETS.items():  # the pair that matters alternates, so a warming disk favors neither
        results["runs"][name] = [run(code) for _ in range(args.repeats if name.startswith("sdlora") else 1)]
    results["importtime"] = run("import sdlora.train", importtime=True)
    results["medians"] = {name: {k: statistics.median(r[k] for r in runs) for k in runs[0]
                                 if isinstance(runs[0][k], float)} for name, runs in results["runs"].items()}
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    for name, m in results["medians"].items():
        print(f"{name:42s} " + "  ".join(f"{k} {v:.2f}" for k, v in m.items()))
    imports = results["importtime"]["imports"]
    print(f"import sdlora.train (-X importtime): {imports['modules']} modules, {imports['total_self_s']:.2f} s self")
    for package, s in imports["by_package_s"].items():
        print(f"  {package:28s} {s:.2f}")


if __name__ == "__main__":
    main()
