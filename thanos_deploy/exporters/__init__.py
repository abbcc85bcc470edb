"""Exporters: ONNX and TensorRT (see issue 5)."""
