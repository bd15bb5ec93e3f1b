"""Make a bitsandbytes wheel small enough to copy to a GPU machine without network access: keep one CUDA build.

    python scripts/slim_bnb_wheel.py WHEEL --cuda 130 --out .whl/

The published wheel (~43 MB) holds a library per CUDA and ROCm version; the GPU machine's torch is built for one
(`torch.version.cuda`, e.g. 13.0 -> 130). The slim wheel keeps the Python package and that one library, and
rewrites RECORD to match.
"""

import argparse
import re
import zipfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("wheel")
    ap.add_argument("--cuda", required=True, help="CUDA version of the target torch without the dot, e.g. 130")
    ap.add_argument("--out", default=".whl")
    args = ap.parse_args()
    src = Path(args.wheel)
    dest = Path(args.out) / src.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    keep_lib = f"libbitsandbytes_cuda{args.cuda}.so"

    def wanted(name: str) -> bool:
        base = name.rsplit("/", 1)[-1]
        return not re.match(r"libbitsandbytes_(cuda|rocm)\w*\.so$", base) or base == keep_lib

    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w", zipfile.ZIP_DEFLATED) as zout:
        names = [i.filename for i in zin.infolist()]
        if not any(n.endswith(keep_lib) for n in names):
            raise SystemExit(f"{src.name} has no {keep_lib}")
        for info in zin.infolist():
            if not wanted(info.filename):
                continue
            data = zin.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = [ln for ln in data.decode().splitlines() if wanted(ln.split(",", 1)[0])]
                data = ("\n".join(lines) + "\n").encode()
            zout.writestr(info, data)
    print(f"{dest}: {dest.stat().st_size / 2**20:.1f} MiB (kept {keep_lib})")


if __name__ == "__main__":
    main()
