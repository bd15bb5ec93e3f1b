"""Turn OpenAI CLIP's BPE vocabulary into the vocab.json + merges.txt that transformers' CLIPTokenizer loads.

Source: `bpe_simple_vocab_16e6.txt.gz`, shipped inside the MIT-licensed `open_clip_torch` wheel (and in OpenAI's
CLIP repo). Fetch it without installing the package:

    pip download --no-deps open_clip_torch -d /tmp/oc && cd /tmp/oc && unzip -o *.whl 'open_clip/*.gz'
    python scripts/make_tokenizer.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz sdlora/tiny/model/tokenizer

The result is the tokenizer every SD1.x checkpoint ships: 49408 tokens, bos 49406, eos 49407.
"""

import gzip
import json
import sys
from pathlib import Path


def _bytes_to_unicode() -> list[str]:
    # GPT-2/CLIP byte-level BPE: every byte gets a printable unicode stand-in.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]  # CLIP's order: printable bytes first, then the remapped ones


def convert(bpe_gz: Path, out_dir: Path) -> None:
    lines = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]  # CLIP keeps the first 48894 merges
    byte_tokens = _bytes_to_unicode()
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    assert len(tokens) == 49408, len(tokens)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")


def compact(folder: Path) -> None:
    """Rewrite the tokenizer.json in `folder` without indentation: the same tokenizer in half the bytes (transformers
    writes it pretty-printed). Every script that saves a tokenizer calls this. The padding and truncation a tokenizer
    was last called with are dropped too: transformers sets both at every call, and without them a tokenizer saved
    after use is the same file as one saved fresh."""
    path = Path(folder) / "tokenizer.json"
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    tokenizer.update(truncation=None, padding=None)
    path.write_text(json.dumps(tokenizer, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")


def main() -> None:
    from transformers import CLIPTokenizer

    src, out = Path(sys.argv[1]), Path(sys.argv[2])
    convert(src, out)
    tok = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=77)
    ids = tok("a red circle").input_ids
    assert ids == [49406, 320, 736, 7117, 49407], ids
    tok.save_pretrained(str(out))
    compact(out)
    print(f"wrote {out}: {len(tok)} tokens, 'a red circle' -> {ids}")


if __name__ == "__main__":
    main()
