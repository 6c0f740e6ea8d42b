"""TensorRT engines: the build plan (pure data), the thin TensorRT build layer, and engine manifests."""
