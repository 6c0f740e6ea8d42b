"""The small vocabularies that options and config.json entries take, each named in one place.

Layer 0 (no torch), so the artifact layer checks a run's config.json with the same names the modules
that build and run the model use (`nn`, `models`, `export`, the torch runner).
"""

from __future__ import annotations

#: how a routed layer runs its experts: "dense" (every expert runs and a mask selects; a run's default)
#: or "sparse" (each expert runs only on the rows routed to it; export's default)
DISPATCHES = ("dense", "sparse")
#: how a deploytool Router scores its experts: "softmax" over n experts (a run's default), or "sigmoid"
#: (one logit, exactly 2 experts)
ROUTER_KINDS = ("softmax", "sigmoid")
#: the built-in models a run's config.json may name, in `deploytool.models.MODELS` order (it builds them)
BUILTIN_MODELS = ("routed-mlp", "routed-cnn", "moe-transformer")
#: how an export lowers experts that ONNX Runtime's fused com.microsoft::MoE op can compute: "deploytool"
#: (deploytool's own dispatch, any runtime), "ort" (the MoE op; ONNX Runtime only) or "auto" (the op on
#: small batches, deploytool's sparse graph on large ones, chosen by an ONNX If on the row count)
MOE_OPS = ("deploytool", "ort", "auto")
#: the MoE-op choices that put the op into the graph
MOE_OP_NODES = ("ort", "auto")
