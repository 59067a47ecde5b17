"""A minimal OIP v2 model server on onnxruntime, for tests that must run without kserve or torch.

    python onnx_model_server.py MODEL.onnx PORT [NAME]

Serves `GET /v2/health/ready` and `POST /v2/models/NAME/infer` (JSON, one FP32 input) with
the ONNX graph's first output as `logits`. A real model: the registry's exported DenseNet.
"""

from __future__ import annotations

import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # tests/: run as a script, not collected
from servers import send_json  # noqa: E402


def main() -> None:
    path, port = sys.argv[1], int(sys.argv[2])
    name = sys.argv[3] if len(sys.argv) > 3 else "digits"
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    in_name, out_name = sess.get_inputs()[0].name, sess.get_outputs()[0].name

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *a) -> None:
            pass

        def do_GET(self) -> None:
            send_json(self, 200 if self.path.startswith("/v2/health") else 404, {})

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.path != f"/v2/models/{name}/infer":
                return send_json(self, 404, {"error": "no such model"})
            try:
                t = json.loads(body)["inputs"][0]
                x = np.asarray(t["data"], np.float32).reshape(t["shape"])
                y = sess.run([out_name], {in_name: x})[0]
            except (KeyError, ValueError, TypeError, IndexError) as exc:
                return send_json(self, 400, {"error": str(exc)})
            send_json(self, 200, {"model_name": name, "outputs": [
                {"name": "logits", "shape": list(y.shape), "datatype": "FP32", "data": y.ravel().tolist()}]})

    srv = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    srv.daemon_threads = True
    srv.serve_forever()


if __name__ == "__main__":
    main()
