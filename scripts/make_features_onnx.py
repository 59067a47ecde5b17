"""Write a registry entry's features export (ONNX with logits and embeddings) and record it.

    python scripts/make_features_onnx.py digits:v3 [--registry models]

The analysis worker runs this file through onnxruntime for the shadow prediction and the
drift embeddings, so a sidecar needs no torch (sentinel.analysis.shadow). Needs torch to
make. The same weights give the same bytes (checked: the script exports twice and compares).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from sentinel.analysis.shadow import export_features_onnx
from sentinel.registry import ExportRef, Registry, sha256_file

FILE = "model.features.onnx"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="NAME:VERSION")
    ap.add_argument("--registry", default="models")
    args = ap.parse_args(argv)
    entry = Registry(args.registry).resolve(args.model)
    model = entry.build_model()
    out = entry.directory / FILE
    export_features_onnx(model, tuple(entry.manifest.input.shape), out)
    with tempfile.TemporaryDirectory() as tmp:
        again = Path(tmp) / FILE
        export_features_onnx(entry.build_model(), tuple(entry.manifest.input.shape), again)
        if sha256_file(again) != sha256_file(out):
            print(f"{out}: two exports of the same weights differ; not recorded", file=sys.stderr)
            return 1
    ref = ExportRef(format="onnx", file=FILE, sha256=sha256_file(out), precision="fp32",
                    dynamic_batch=True, outputs=("logits", "embeddings"))
    entry.with_export(ref)
    print(f"{out}: {out.stat().st_size} bytes, sha256 {ref.sha256}; recorded in {entry.manifest_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
