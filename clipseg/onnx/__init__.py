"""ONNX: exporting a model to graphs and a manifest (`export`, behind export.py) and running them in onnxruntime
(`backend`)."""
