#!/usr/bin/env python3
"""The tiny test tokenizer: a Mistral-style byte-fallback BPE whose vocabulary fits the
tiny fixture models (V = 256), so that tests can feed text data to them.

Writes `tests/fixtures/tiny-tokenizer/{tokenizer.json,tokenizer_config.json}`. Run by hand
from the crate root (Python 3 standard library only; not part of CI):

    python3 tools/make_tiny_tokenizer.py

The vocabulary is built, not trained, so that tests can compute ids by hand:

    0 <unk>, 1 <s>, 2 </s>                    special, as in Mistral
    3..=194   <0x00>..<0xBF>                  id = byte + 3
    195..=245 <0xC2>..<0xF4>                  id = byte + 1
    246.. ▁ e h t ▁t he ▁the                  pieces, merged in that order

The bytes 0xC0, 0xC1 and 0xF5..=0xFF never occur in UTF-8, so leaving them out still lets
byte fallback encode any text without `<unk>` while keeping the vocabulary at 253 entries.
The normalizer, post-processor and decoder are Mistral-7B v0.1's (tokenizer.json of
tests/fixtures/mistral-tokenizer), and so is tokenizer_config.json, chat template included.
"""

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MISTRAL = ROOT / "tests/fixtures/mistral-tokenizer"
OUT = ROOT / "tests/fixtures/tiny-tokenizer"

SPECIALS = ["<unk>", "<s>", "</s>"]
UTF8_BYTES = [b for b in range(256) if b not in (0xC0, 0xC1) and b < 0xF5]
PIECES = ["▁", "e", "h", "t"]
MERGES = [("▁", "t"), ("h", "e"), ("▁t", "he")]


def main():
    mistral = json.loads((MISTRAL / "tokenizer.json").read_text())
    vocab = {}
    for token in SPECIALS + [f"<0x{b:02X}>" for b in UTF8_BYTES] + PIECES:
        vocab[token] = len(vocab)
    for a, b in MERGES:
        vocab[a + b] = len(vocab)
    assert len(vocab) <= 256, len(vocab)

    tokenizer = dict(mistral)
    tokenizer["model"] = dict(mistral["model"])
    tokenizer["model"]["vocab"] = vocab
    tokenizer["model"]["merges"] = [list(m) for m in MERGES]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "tokenizer.json").write_text(
        json.dumps(tokenizer, ensure_ascii=False, indent=2) + "\n"
    )
    (OUT / "tokenizer_config.json").write_text(
        (MISTRAL / "tokenizer_config.json").read_text()
    )
    print(f"wrote {OUT} ({len(vocab)} tokens)")


if __name__ == "__main__":
    main()
