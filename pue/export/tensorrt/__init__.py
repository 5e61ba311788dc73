"""TensorRT engines from ONNX bundles: profiles, metadata, the build and its fidelity gate.

TensorRT itself is imported only when an engine is built (`build.build_engine_bundle`).
"""
