"""Graph optimisations for one target runtime, applied to a bundle's standard-ONNX graphs.

The root graphs a bundle ships use standard ONNX only (TensorRT parses them); what is written here uses
onnxruntime's contrib ops and goes only into `--target onnxruntime` outputs, behind the same fidelity gate.
"""
