"""Export verification: run an export and the reference on golden inputs, compare, localize.

`runtime` runs exports (onnxruntime, TorchScript), `stats` computes error statistics,
`policy` says what passes by precision, `localize` finds the first diverging module,
`verifier` ties them together into a `VerifyReport`.
"""
