"""Exporting a registry model: ONNX (torch.onnx), TorchScript, int8 ONNX (onnxruntime QDQ).

Every export is recorded in the model's model.yaml (`exports:`) with its sha256, so
`sentinel verify` and the release pipeline know what they are looking at.
"""
