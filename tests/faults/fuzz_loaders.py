"""Timed fuzzing of the weight loaders (a run of minutes, not a unit test).

    PYTHONPATH=. python tests/faults/fuzz_loaders.py --seconds 60            # every loader, one process each
    PYTHONPATH=. python tests/faults/fuzz_loaders.py --seconds 60 --loader legacy.pt

Mutates a valid seed file (truncations, bit flips, overwritten words, deletions, insertions,
spliced copies), or makes up a safetensors header or a torch.save of odd objects, and loads it; anything but success or a WeightsError naming the file is an
escape: it is printed and the file kept under --keep for reproduction. Each loader runs in
its own process, so a crash of a native reader (a signal) shows as that loader's failure.
"""

from __future__ import annotations

import argparse
import collections
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loader_seeds import (  # noqa: E402
    expect_loaded_or_weights_error,
    mutate,
    onnx_file,
    pt_legacy,
    pt_zip,
    safetensors_file,
    safetensors_with_header,
)

LOADERS = {"zip.pt": pt_zip, "legacy.pt": pt_legacy, "w.safetensors": safetensors_file, "m.onnx": onnx_file,
           "header.safetensors": None, "objects.pt": None}   # the last two are generated, not mutated
DTYPES = ["F16", "BF16", "F32", "F64", "I8", "U8", "I16", "I32", "I64", "BOOL", "C64", "F8_E4M3", "F33", "", "int"]


def random_header_file(rng: random.Random) -> bytes:
    """A safetensors file whose JSON header rng makes up: dtypes, shapes, offsets, lengths."""
    def number() -> int:
        return rng.choice([rng.randint(0, 8), rng.randint(-2, 64), 2 ** rng.randint(8, 70), 10 ** 30])

    header: dict = {}
    for i in range(rng.randint(0, 3)):
        entry = {"dtype": rng.choice(DTYPES), "shape": [number() for _ in range(rng.randint(0, 4))],
                 "data_offsets": [number() for _ in range(rng.choice([2, 2, 2, 0, 1, 3]))]}
        if rng.random() < 0.1:
            entry = rng.choice([[], "x", 3, {"dtype": "F32"}])
        header[rng.choice([f"t{i}", "__metadata__", ""])] = entry
    return safetensors_with_header(header, rng.randbytes(rng.randint(0, 64)))


def random_object_file(rng: random.Random) -> bytes:
    """A torch.save of nested containers, scalars and tensors of assorted dtypes and layouts."""
    import io

    import torch

    def leaf():
        kind = rng.randrange(8)
        if kind == 0:
            return torch.randn(rng.randint(0, 3), rng.randint(1, 3))
        if kind == 1:
            return torch.zeros(2, dtype=rng.choice([torch.int8, torch.bool, torch.complex64, torch.float16,
                                                    torch.bfloat16, torch.uint8]))
        if kind == 2:
            return torch.tensor([float("nan"), float("inf")])
        if kind == 3:
            return torch.zeros(3).to_sparse()
        if kind == 4:
            return torch.zeros(4)[::2]   # a view sharing storage
        return rng.choice([None, 3, 2.5, "text", b"bytes", (1, 2), 2 ** 80])

    def value(depth: int):
        if depth > 2 or rng.random() < 0.6:
            return leaf()
        if rng.random() < 0.5:
            return [value(depth + 1) for _ in range(rng.randint(0, 3))]
        return {rng.choice(["a", "state_dict", 1, "b.weight"]): value(depth + 1) for _ in range(rng.randint(0, 3))}

    buf = io.BytesIO()
    torch.save(value(0), buf, _use_new_zipfile_serialization=rng.random() < 0.5)
    return buf.getvalue()


def loader_for(name: str):
    if name.endswith(".onnx"):
        from sentinel.verify.runtime import OnnxExport

        return lambda p: OnnxExport(p, threads=1)
    from sentinel.reference.weights import read_state_dict

    return read_state_dict


def fuzz_one(name: str, seconds: float, seed: int, keep: Path) -> int:
    import warnings

    warnings.simplefilter("ignore")
    rng = random.Random(seed)
    seed_fn = LOADERS[name]
    base = seed_fn() if seed_fn is not None else b""
    make = {"header.safetensors": random_header_file, "objects.pt": random_object_file}.get(
        name, lambda r: mutate(base, r))
    load = loader_for(name)
    work = Path(tempfile.mkdtemp(prefix="sentinel-fuzz-"))
    counts: collections.Counter[str] = collections.Counter()
    escapes: dict[str, Path] = {}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        data = make(rng)
        path = work / name
        path.write_bytes(data)
        try:
            got = expect_loaded_or_weights_error(load, path)
            counts["loaded" if got is not None else "WeightsError"] += 1
        except BaseException as exc:  # noqa: BLE001 - an escape is what this run looks for
            if isinstance(exc, KeyboardInterrupt):
                raise
            key = f"{type(exc).__name__}: {str(exc)[:120]}"
            counts["escaped"] += 1
            if key not in escapes:
                keep.mkdir(parents=True, exist_ok=True)
                escapes[key] = keep / f"{name}.{len(escapes)}"
                escapes[key].write_bytes(data)
    total = sum(counts.values())
    print(f"{name}: {total} inputs in {seconds:g} s: {dict(counts)}", flush=True)
    for key, p in escapes.items():
        print(f"  escaped: {key} (input kept in {p})")
    return 1 if escapes else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--loader", choices=sorted(LOADERS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=Path(tempfile.gettempdir()) / "sentinel-fuzz-escapes")
    a = ap.parse_args()
    if a.loader:
        return fuzz_one(a.loader, a.seconds, a.seed, a.keep)
    worst = 0
    for name in LOADERS:
        r = subprocess.run([sys.executable, __file__, "--loader", name, "--seconds", str(a.seconds),
                            "--seed", str(a.seed), "--keep", str(a.keep)])
        if r.returncode != 0:
            print(f"{name}: exit status {r.returncode}" + (" (killed by a signal)" if r.returncode < 0 else ""))
        worst = worst or r.returncode
    return 1 if worst else 0


if __name__ == "__main__":
    sys.exit(main())
