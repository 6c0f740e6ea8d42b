"""Serving: Triton Inference Server model repositories (`package`) and a live KServe v2 server (`serve`).

config.py turns a model's tensor signature into a Triton model configuration; repository.py writes a
model repository atomically; triton_model.py is the Python-backend model that serves any artifact
through the deploytool runtime; server.py runs a real tritonserver (bundled by nvidia-pytriton) on it.
"""
