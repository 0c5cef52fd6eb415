"""ONNX: the graphs export.py writes and the backend that runs them in onnxruntime."""
