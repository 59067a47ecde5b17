"""Exporting a registry model: ONNX (torch.onnx), TorchScript, int8 ONNX (onnxruntime QDQ), fp16
ONNX and TorchScript (half-precision weights and activations, float32 inputs and outputs).

An export written into the model's directory is recorded in its model.yaml (`exports:`) with its
sha256 (elsewhere only with `--register`), so
`sentinel verify` and the release pipeline know what they are looking at.
"""
