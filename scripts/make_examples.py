"""Write examples/request.json and examples/request.bin: one held-out digit for digits:v3 (OIP v2).

    python scripts/make_examples.py            # rewrites the files (they are committed)
    python scripts/make_examples.py --check    # exit 1 when the committed files differ

The digit is the first of digits:v3's held-out split (model.yaml `split.holdout`), never seen
in training or in the golden set; its 8×8 pixels are sent raw (0–16), as the model server
expects (model.yaml `raw_input`). The binary form uses the OIP v2 binary tensor extension:
a JSON header of `Inference-Header-Content-Length` bytes, then the FP32 pixels.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples"


def example_digit() -> tuple[np.ndarray, int, int]:
    """(8×8 float32 pixels, label, index into load_digits()) of the first held-out digit."""
    import yaml

    from sentinel.training.digits import load_split

    manifest = yaml.safe_load((REPO / "models" / "digits" / "v3" / "model.yaml").read_text())
    index = int(manifest["split"]["holdout"][0])
    images, labels, _ = load_split()
    return images[index].astype(np.float32), int(labels[index]), index


def render() -> dict[str, bytes]:
    pixels, label, index = example_digit()
    data = [float(v) for v in pixels.reshape(-1)]
    doc = {"id": f"digits-holdout-{index}-label-{label}",
           "inputs": [{"name": "input", "shape": [1, 8, 8], "datatype": "FP32", "data": data}]}
    as_json = (json.dumps(doc, separators=(",", ":")) + "\n").encode()
    header = {"id": doc["id"],
              "inputs": [{"name": "input", "shape": [1, 8, 8], "datatype": "FP32",
                          "parameters": {"binary_data_size": 4 * len(data)}}],
              "outputs": [{"name": "probabilities", "parameters": {"binary_data": False}}]}
    head = json.dumps(header, separators=(",", ":")).encode()
    as_bin = head + pixels.astype("<f4").tobytes()
    return {"request.json": as_json, "request.bin": as_bin}


def header_length() -> int:
    """The value of the `Inference-Header-Content-Length` header for examples/request.bin."""
    body = render()["request.bin"]
    return len(body) - 4 * 64


def main(argv: list[str]) -> int:
    files = render()
    if "--check" in argv:
        bad = [n for n, b in files.items() if not (EXAMPLES / n).is_file() or (EXAMPLES / n).read_bytes() != b]
        for n in bad:
            print(f"examples/{n} differs from what scripts/make_examples.py writes", file=sys.stderr)
        return 1 if bad else 0
    EXAMPLES.mkdir(exist_ok=True)
    for n, b in files.items():
        (EXAMPLES / n).write_bytes(b)
        print(f"wrote examples/{n}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
