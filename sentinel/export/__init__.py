"""Exporting a registry model: ONNX (torch.onnx), TorchScript, int8 ONNX (onnxruntime QDQ).

An export written into the model's directory is recorded in its model.yaml (`exports:`) with its
sha256 (elsewhere only with `--register`), so
`sentinel verify` and the release pipeline know what they are looking at.
"""
