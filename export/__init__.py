"""Stage 2 of the pipeline: trained model directory -> ONNX (explicit state) -> TensorRT plan + Triton configs."""
