"""The anomaly detector component: sensor batches -> sliding windows -> features -> ONNX score -> events.

Imports numpy, onnxruntime, cryptography and the SDK; never scikit-learn or scipy (RSS and start time).
"""
