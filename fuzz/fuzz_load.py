"""Fuzz the `.d3` reader for as long as you like: `load` must raise only `D3FormatError`.

    python fuzz/fuzz_load.py --seconds 600      # random mutations of valid files, CRC fixed up
    python fuzz/fuzz_load.py --examples 100000  # or a fixed number of inputs

Each input is a valid file (random contents) with a few byte-level mutations (flip, overwrite,
insert, delete, splice), with the CRC and, half the time, the header re-encoded so that the
mutations reach the checks behind the checksum. Any other exception, or a file that loads but
does not re-save to itself, is printed with a reproducer and the run exits 1. Deterministic
for a given --seed.
"""
from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import time
import traceback
import zlib

from d3codec.format import D3FormatError, dumps, loads
from d3codec.format.io import MAGIC, PRELUDE, PRELUDE_SIZE, _align
from d3codec.format.testing import random_d3


def _recrc(data: bytes) -> bytes:
    return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4])) if len(data) >= 4 else data


def _mutate_bytes(rng: random.Random, data: bytearray) -> None:
    op = rng.randrange(5)
    pos = rng.randrange(max(1, len(data)))
    if op == 0 and data:
        data[pos] ^= 1 << rng.randrange(8)
    elif op == 1 and data:
        data[pos] = rng.choice([0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)])
    elif op == 2:
        data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
    elif op == 3 and data:
        del data[pos : pos + rng.randrange(1, 9)]
    elif data:
        n = rng.randrange(1, 9)
        src = rng.randrange(max(1, len(data)))
        data[pos : pos + n] = data[src : src + n]


def _mutate_header(rng: random.Random, data: bytes) -> bytes:
    """Re-encode the header after changing one JSON value, keeping the prelude consistent."""
    fields = PRELUDE.unpack_from(data, 0)
    if fields[3] != 0:
        import zstandard

        head = zstandard.ZstdDecompressor().decompress(data[PRELUDE_SIZE : PRELUDE_SIZE + fields[6]])
    else:
        head = data[PRELUDE_SIZE : PRELUDE_SIZE + fields[6]]
    obj = json.loads(head)
    nodes = [obj]
    targets = []
    while nodes:
        node = nodes.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, value in items:
            targets.append((node, key))
            if isinstance(value, (dict, list)):
                nodes.append(value)
    node, key = rng.choice(targets)
    choice = rng.randrange(6)
    if choice == 0 and isinstance(node, dict):
        del node[key]
    else:
        node[key] = [None, -1, 0, 1, 2**31, 2**64, 1.5, "x", [], {}, True, [2**31] * 9][rng.randrange(12)] if choice < 5 else node[key]
    new = json.dumps(obj).encode()
    start = _align(PRELUDE_SIZE + fields[6])
    area = data[start:-4]
    nstart = _align(PRELUDE_SIZE + len(new))
    length = nstart + len(area) + 4
    out = PRELUDE.pack(MAGIC, fields[1], fields[2], 0, 0, 0, len(new), len(new), length) + new
    return out + bytes(nstart - len(out)) + area + b"\0\0\0\0"


def run(seconds: float, examples: int, seed: int) -> int:
    rng = random.Random(seed)
    seeds = [random_d3(i, num_classes=rng.randrange(1, 5), decoders=1 + i % 2, labels=["hard", "dense", "topk"][i % 3],
                       kind=["diag", "lowrank", "full"][i % 3], dtype=["F32", "F16", "I8", "U8", "BF16"][i % 5])
             for i in range(12)]
    corpus = [dumps(d) for d in seeds]
    start, n = time.monotonic(), 0
    while (examples and n < examples) or (not examples and time.monotonic() - start < seconds):
        n += 1
        data = rng.choice(corpus)
        if rng.random() < 0.5:
            data = _mutate_header(rng, data)
        buf = bytearray(data)
        for _ in range(rng.randrange(0, 4)):
            _mutate_bytes(rng, buf)
        data = _recrc(bytes(buf)) if rng.random() < 0.9 else bytes(buf)
        try:
            d3 = loads(data)
        except D3FormatError:
            continue
        except Exception:  # noqa: BLE001 - the point of a fuzzer
            print(f"FAIL after {n} inputs (seed {seed}): non-D3FormatError on input {data.hex()}", file=sys.stderr)
            traceback.print_exc()
            return 1
        again = loads(dumps(d3))
        if dumps(again) != dumps(d3):
            print(f"FAIL after {n} inputs (seed {seed}): loaded file does not re-save stably: {data.hex()}", file=sys.stderr)
            return 1
    print(f"ok: {n} inputs in {time.monotonic() - start:.1f}s, only D3FormatError raised (seed {seed})")
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description="Fuzz d3codec.format.loads")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--examples", type=int, default=0, help="stop after this many inputs (overrides --seconds)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sys.exit(run(args.seconds, args.examples, args.seed))


if __name__ == "__main__":
    main()
