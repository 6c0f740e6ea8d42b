"""Hostile input to `deploytool.load` and `Session.run` (items 8-13, 16, 20 of issue 18)."""

from __future__ import annotations

import numpy as np
import pytest

import deploytool
from deploytool.errors import BadInput, DeployToolError

from .conftest import edit_signature, embedding_onnx, no_input_onnx, tiny_onnx

# --- 9. zero-size positions -------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 0, 4), (0, 5, 4)])
def test_a_feed_with_no_positions_is_refused(tokens, shape):
    with deploytool.load(tokens) as session, pytest.raises(BadInput, match="no positions|empty batch"):
        session.run(np.zeros(shape, np.float32))


# --- 11. silent conversions -------------------------------------------------------------------------

def test_negative_and_out_of_range_token_ids_are_refused_naming_the_vocabulary(embedding):
    with deploytool.load(embedding) as session:
        assert session.run(np.array([[0, 9, 3]]))["output"].shape == (1, 3)
        with pytest.raises(BadInput, match="negative id -1"):
            session.run(np.array([[0, -1, 3]]))
        with pytest.raises(BadInput, match=r"holds the id 10; the model takes ids 0\.\.9"):
            session.run(np.array([[0, 10, 3]]))


def test_the_onnxruntime_runner_itself_refuses_an_id_past_the_vocabulary(embedding):
    """verify and bench feed runners directly: the bound holds there too, not only in Session.run."""
    from deploytool.runners import make_runner

    with make_runner("onnxruntime", embedding) as runner, pytest.raises(BadInput, match="ids 0..9"):
        runner.infer({"ids": np.array([[12, 1]])})


def test_non_integral_values_for_an_integer_input_are_refused_not_truncated(embedding):
    with deploytool.load(embedding) as session:
        with pytest.raises(BadInput, match="non-integral"):
            session.run([[1.9, 2.0]])
        whole = session.run([[1.0, 2.0]])
        assert np.array_equal(whole["output"], session.run(np.array([[1, 2]]))["output"])


def test_a_huge_integer_in_a_list_is_bad_input_not_overflow(embedding, tiny):
    with deploytool.load(embedding) as session, pytest.raises(BadInput, match="range|not numbers"):
        session.run([[2**70, 1]])
    with deploytool.load(tiny) as session, pytest.raises(BadInput, match="not numbers|cannot be read"):
        session.run([["a"] * 8])


def test_a_tensor_given_twice_is_refused(tiny):
    x = np.zeros((2, 8), np.float32)
    with deploytool.load(tiny) as session, pytest.raises(BadInput, match="given twice"):
        session.run(x, x=x + 1)


# --- 20. the Python API raises deploytool's errors --------------------------------------------------

@pytest.mark.parametrize("options, match", [
    ({"bogus": 1}, "takes no option 'bogus'"),
    ({"threads": "x"}, "threads must be a whole number"),
    ({"threads": True}, "threads must be a whole number"),
    ({"threads": -2}, "threads must be a whole number"),
])
def test_bad_load_options_are_bad_input(tiny, options, match):
    with pytest.raises(BadInput, match=match):
        deploytool.load(tiny, **options)


def test_object_arrays_given_to_fit_are_bad_input(tmp_path):
    pytest.importorskip("torch")
    from conftest import token_moe

    x = np.array([object()] * 4 * 5 * 6, dtype=object).reshape(4, 5, 6)
    with pytest.raises(BadInput, match="numeric arrays"):
        deploytool.fit(token_moe(), (x, np.zeros(4, int)), out=tmp_path / "run",
                       loop=deploytool.LoopSettings(epochs=1))


@pytest.mark.parametrize("dims", [{"x": [1]}, {"x": {"1": "tokens"}}, ["x"]])
def test_malformed_dynamic_dims_are_bad_input(tmp_path, dims):
    torch = pytest.importorskip("torch")
    from conftest import token_moe

    with pytest.raises(BadInput, match="dynamic dims"):
        deploytool.export_onnx(token_moe(), tmp_path / "m.onnx", example_inputs=torch.randn(2, 5, 6),
                               dynamic_dims=dims, validate=False)


# --- 12. symlink loops ------------------------------------------------------------------------------

def test_a_symlink_loop_is_named_as_one(loop):
    with pytest.raises(BadInput, match="symlink loop"):
        deploytool.load(loop)


# --- 16. ONNX Runtime's own log lines -----------------------------------------------------------------

def test_onnxruntime_logs_nothing_of_its_own_when_a_run_fails(tmp_path, capfd):
    """The table is computed, so no bound is known and the bad id reaches ONNX Runtime: its failure is
    an exception, and its red log line stays out of the output."""
    model = embedding_onnx(tmp_path / "hidden.onnx", computed_table=True)
    with deploytool.load(model) as session:
        capfd.readouterr()
        with pytest.raises(Exception):
            session.run(np.array([[99, 1]]))
    assert "onnxruntime" not in capfd.readouterr().err.lower()


# --- 8 and 10. numbers and router entries of a tampered signature ------------------------------------

def _router(data):
    return data["routers"][0]


TAMPERED = {
    "example dim 1e12": (lambda d: d["dim_examples"].update(batch=10**12), "example size batch"),
    "example dim float": (lambda d: d["dim_examples"].update(batch=1e12), "example size batch"),
    "negative example dim": (lambda d: d["dim_examples"].update(batch=-1), "example size batch"),
    "n_experts 1e12": (lambda d: _router(d).update(n_experts=10**12), "n_experts=1000000000000"),
    "n_experts 0": (lambda d: _router(d).update(n_experts=0), "n_experts=0"),
    "n_experts -3": (lambda d: _router(d).update(n_experts=-3), "n_experts=-3"),
    "n_experts true": (lambda d: _router(d).update(n_experts=True), "n_experts=True"),
    "n_experts 2.7": (lambda d: _router(d).update(n_experts=2.7), "n_experts=2.7"),
    "dim as a list": (lambda d: d["inputs"][0].update(shape=["batch", [8]]), r"the dim \[8\]"),
    "negative dim": (lambda d: d["inputs"][0].update(shape=["batch", -5]), "the dim -5"),
    "temperature NaN": (lambda d: _router(d).update(temperature=float("nan")), "temperature=nan"),
    "temperature -1": (lambda d: _router(d).update(temperature=-1), "temperature=-1"),
    "temperature 0": (lambda d: _router(d).update(temperature=0), "temperature=0"),
    "index is probs": (lambda d: _router(d).update(index="router.probs"), "both index and probs"),
    "nested JSON": (lambda d: "[" * 100_000, "unreadable"),
    "no inputs": (lambda d: d.update(inputs=[]), "no inputs"),
}


@pytest.mark.parametrize("edit, match", TAMPERED.values(), ids=TAMPERED.keys())
def test_a_tampered_signature_is_bad_input_naming_the_entry(tiny, edit, match):
    edit_signature(tiny, edit)
    with pytest.raises(BadInput, match=match):
        deploytool.load(tiny)


GRAPH_MISMATCH = {
    "index at a float output": (lambda d: _router(d).update(index="output"), "is float32, not an integer"),
    "index and probs swapped": (lambda d: _router(d).update(index="router.probs", probs="router.index"),
                                "not an integer tensor|not a floating tensor"),
    "2 experts for 4-wide probs": (lambda d: _router(d).update(n_experts=2), "holds 4 per position"),
}


@pytest.mark.parametrize("edit, match", GRAPH_MISMATCH.values(), ids=GRAPH_MISMATCH.keys())
def test_router_entries_are_checked_against_the_graphs_outputs(tmp_path, edit, match):
    model = edit_signature(tiny_onnx(tmp_path / "four.onnx", experts=4), lambda d: None)
    edit_signature(model, lambda d: _router(d).update(n_experts=4))
    edit_signature(model, edit)
    with pytest.raises(BadInput, match=match):
        deploytool.load(model)


def test_a_graph_without_inputs_is_refused(tmp_path):
    with pytest.raises(DeployToolError, match="no inputs"):
        deploytool.load(no_input_onnx(tmp_path / "none.onnx"))


def test_valid_routers_of_every_kind_still_load(tiny, tokens, embedding):
    for model in (tiny, tokens, embedding):
        with deploytool.load(model) as session:
            assert session.signature.routers


def test_an_id_past_a_torch_embedding_is_bad_input(tmp_path):
    """A run directory's model runs on torch, whose vocabulary deploytool does not read: torch's
    IndexError comes back as BadInput."""
    torch = pytest.importorskip("torch")
    from deploytool.runners import make_runner
    from deploytool.runtime import Session

    class Embedded(torch.nn.Module):
        def __init__(self):
            super().__init__()
            from deploytool.nn import RoutedExperts, Router

            self.embed = torch.nn.Embedding(10, 4)
            self.moe = RoutedExperts(Router(4, 2), [torch.nn.Linear(4, 4) for _ in range(2)])

        def forward(self, ids):
            return self.moe(self.embed(ids).mean(dim=1)).output

    runner = make_runner("torch", Embedded().eval(), example_inputs=torch.zeros(2, 3, dtype=torch.long))
    with Session(runner) as session:
        assert session.run(np.array([[1, 2, 9]]))["output"].shape == (1, 4)
        with pytest.raises(BadInput, match="beyond the size of its embedding"):
            session.run(np.array([[1, 2, 10]]))


def test_a_routing_index_outside_the_experts_is_refused_at_run(tmp_path):
    """The graph's index passes every static check (int64, the positions' shape) but its values are not
    expert numbers: the run says so instead of handing out a decision that names no expert."""
    import onnx
    from onnx import helper, numpy_helper

    path = tiny_onnx(tmp_path / "shifted.onnx")
    model = onnx.load(str(path))
    argmax = next(n for n in model.graph.node if n.op_type == "ArgMax")
    argmax.output[0] = "raw_index"
    model.graph.initializer.append(numpy_helper.from_array(np.array(5, np.int64), "five"))
    model.graph.node.append(helper.make_node("Add", ["raw_index", "five"], ["router.index"]))
    onnx.save(model, str(path))
    with deploytool.load(path) as session, pytest.raises(BadInput, match="chose expert 5 of its 2"):
        session.run(np.zeros((2, 8), np.float32))


def test_top_k_router_entries_are_checked_by_their_index_shape():
    """A router entry may carry k (top-k routing): its index has one more trailing dim of size k than
    the positions; k == 1 (or no k) keeps the positions' shape."""
    import types

    from deploytool.signature import ModelSignature, TensorMeta, check_router_outputs

    def signature(index_shape, k):
        router = types.SimpleNamespace(path="moe", n_experts=4, temperature=1.0, index="moe.index",
                                       probs="moe.probs", k=k)
        outputs = (TensorMeta("moe.index", "int64", index_shape), TensorMeta("moe.probs", "float32", ("batch", "t", 4)))
        return ModelSignature((TensorMeta("x", "float32", ("batch", "t", 8)),), outputs, (router,))

    check_router_outputs(signature(("batch", "t", 2), 2), "m.onnx")
    check_router_outputs(signature(("batch", "t"), 1), "m.onnx")
    for shape, k in ((("batch", "t"), 2), (("batch", "t", 3), 2), (("batch", "t", 1), 1)):
        with pytest.raises(BadInput, match="the index should be"):
            check_router_outputs(signature(shape, k), "m.onnx")


@pytest.mark.parametrize("k", [0, 5, 1.5, True])
def test_a_stored_k_outside_1_to_n_experts_is_refused(tiny, k):
    edit_signature(tiny, lambda d: _router(d).update(k=k))
    with pytest.raises(BadInput, match=f"k={k!r}"):
        deploytool.load(tiny)
