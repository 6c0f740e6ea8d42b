"""torch -> ONNX with deploytool's routing ops, and validation against PyTorch right after export."""
