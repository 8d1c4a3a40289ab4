"""Fitted scikit-learn models to small, fast float32 ONNX graphs that output an anomaly score.

Every graph takes ``features`` float32 [N, F] and returns ``score`` float32 [N] (higher = more
anomalous); PCA and the autoencoder also return ``contributions`` float32 [N, F] (squared residual
per feature), which the detector turns into the top contributing features and channels.

IsolationForest is written as ONE ``TreeEnsembleRegressor`` node whose leaf values are the leaves'
path lengths (depth + c(n) for the samples left in the leaf), summed over trees, then turned into
sklearn's ``2 ** (-mean_path / c(max_samples))``. skl2onnx's default converter emits ~27 nodes per
tree (2,710 for 100 trees) and scores a row in ~860 us on a small CPU; the fused node does it in
~15 us with the same scores (checked by the builder on every export). PCA, the autoencoder and the
nearest-neighbour distance (``knn``) are a handful of MatMul/Add nodes; skl2onnx converts their
``transform``/``predict``/``kneighbors`` but not the score the detector needs, so the few nodes are
written here directly and checked against scikit-learn the same way.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.decomposition import PCA  # type: ignore[import-untyped]
from sklearn.ensemble import IsolationForest  # type: ignore[import-untyped]
from sklearn.neural_network import MLPRegressor  # type: ignore[import-untyped]

OPSET = 18
ML_OPSET = 3
INPUT = "features"
SCORE = "score"
CONTRIB = "contributions"


def average_path_length(n: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """c(n): the mean path length of an unsuccessful BST search among n points (iForest paper)."""
    n = np.asarray(n, dtype=np.float64)
    out = np.zeros_like(n)
    out[n == 2] = 1.0
    big = n > 2
    out[big] = 2.0 * (np.log(n[big] - 1.0) + np.euler_gamma) - 2.0 * (n[big] - 1.0) / n[big]
    return out


def _model(nodes: list[onnx.NodeProto], inits: list[onnx.TensorProto], n_features: int, *,
           contributions: bool, name: str, ml: bool = False) -> onnx.ModelProto:
    inputs = [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, [None, n_features])]
    outputs = [helper.make_tensor_value_info(SCORE, TensorProto.FLOAT, [None])]
    if contributions:
        outputs.append(helper.make_tensor_value_info(CONTRIB, TensorProto.FLOAT, [None, n_features]))
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=inits)
    opsets = [helper.make_opsetid("", OPSET)]
    if ml:
        opsets.append(helper.make_opsetid("ai.onnx.ml", ML_OPSET))
    model = helper.make_model(graph, opset_imports=opsets, producer_name="nucleus-model-builder")
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def _const(name: str, value: Any) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


def isolation_forest(model: IsolationForest, n_features: int) -> onnx.ModelProto:
    nodes_treeids: list[int] = []
    nodes_nodeids: list[int] = []
    nodes_featureids: list[int] = []
    nodes_values: list[float] = []
    nodes_modes: list[str] = []
    nodes_true: list[int] = []
    nodes_false: list[int] = []
    target_treeids: list[int] = []
    target_nodeids: list[int] = []
    target_weights: list[float] = []
    for t, (est, feats) in enumerate(zip(model.estimators_, model.estimators_features_, strict=True)):
        tree = est.tree_
        left, right = tree.children_left, tree.children_right
        depth = np.zeros(tree.node_count, dtype=np.float64)
        for node in range(tree.node_count):  # children always have larger ids than their parent
            if left[node] != -1:
                depth[left[node]] = depth[node] + 1
                depth[right[node]] = depth[node] + 1
        path = depth + average_path_length(tree.n_node_samples.astype(np.float64))
        for node in range(tree.node_count):
            nodes_treeids.append(t)
            nodes_nodeids.append(node)
            if left[node] == -1:
                nodes_featureids.append(0)
                nodes_values.append(0.0)
                nodes_modes.append("LEAF")
                nodes_true.append(0)
                nodes_false.append(0)
                target_treeids.append(t)
                target_nodeids.append(node)
                target_weights.append(float(path[node]))
            else:
                nodes_featureids.append(int(feats[tree.feature[node]]))
                # sklearn compares float32(x) <= float64(threshold); the float32 just below the
                # threshold keeps that decision exact for every float32 input.
                thr = np.float32(tree.threshold[node])
                if float(thr) > tree.threshold[node]:
                    thr = np.nextafter(thr, np.float32(-np.inf))
                nodes_values.append(float(thr))
                nodes_modes.append("BRANCH_LEQ")
                nodes_true.append(int(left[node]))
                nodes_false.append(int(right[node]))
    n_trees = len(model.estimators_)
    denominator = n_trees * float(average_path_length(np.array([float(model.max_samples_)]))[0])
    ensemble = helper.make_node(
        "TreeEnsembleRegressor", [INPUT], ["path_sum"], domain="ai.onnx.ml", n_targets=1,
        nodes_treeids=nodes_treeids, nodes_nodeids=nodes_nodeids, nodes_featureids=nodes_featureids,
        nodes_values=nodes_values, nodes_modes=nodes_modes, nodes_truenodeids=nodes_true,
        nodes_falsenodeids=nodes_false, target_ids=[0] * len(target_nodeids), target_treeids=target_treeids,
        target_nodeids=target_nodeids, target_weights=target_weights, aggregate_function="SUM",
        post_transform="NONE",
    )
    nodes = [
        ensemble,
        helper.make_node("Mul", ["path_sum", "neg_ln2_over_denominator"], ["log_score"]),
        helper.make_node("Exp", ["log_score"], ["score_2d"]),
        helper.make_node("Reshape", ["score_2d", "flat"], [SCORE]),
    ]
    inits = [_const("neg_ln2_over_denominator", -np.log(2.0) / denominator),
             numpy_helper.from_array(np.array([-1], dtype=np.int64), "flat")]
    return _model(nodes, inits, n_features, contributions=False, name="isolation_forest", ml=True)


def _standardize(mean: npt.NDArray[np.float64], scale: npt.NDArray[np.float64]) -> tuple[list[onnx.NodeProto],
                                                                                         list[onnx.TensorProto]]:
    nodes = [helper.make_node("Sub", [INPUT, "x_mean"], ["x_centred"]),
             helper.make_node("Mul", ["x_centred", "x_inv_scale"], ["z"])]
    return nodes, [_const("x_mean", mean), _const("x_inv_scale", np.float32(1.0) / scale.astype(np.float32))]


def _residual_score(recon: str, nodes: list[onnx.NodeProto]) -> None:
    """score = mean of squared residuals in standardized space; contributions = squared residuals."""
    nodes += [
        helper.make_node("Sub", ["z", recon], ["residual"]),
        helper.make_node("Mul", ["residual", "residual"], [CONTRIB]),
        helper.make_node("ReduceMean", [CONTRIB, "axis1"], [SCORE], keepdims=0),
    ]


def pca(mean: npt.NDArray[np.float64], scale: npt.NDArray[np.float64], model: PCA, t2_weight: float,
        n_features: int) -> onnx.ModelProto:
    """score = mean squared reconstruction residual (Q / F) + t2_weight * T^2 / k (Hotelling)."""
    nodes, inits = _standardize(mean, scale)
    comps = model.components_.astype(np.float64)
    k = comps.shape[0]
    nodes += [
        helper.make_node("Sub", ["z", "pca_mean"], ["zc"]),
        helper.make_node("MatMul", ["zc", "pca_components_t"], ["t"]),
        helper.make_node("MatMul", ["t", "pca_components"], ["t_back"]),
        helper.make_node("Add", ["t_back", "pca_mean"], ["recon"]),
        helper.make_node("Mul", ["t", "t"], ["t_sq"]),
        helper.make_node("Mul", ["t_sq", "t2_scale"], ["t2_terms"]),
        helper.make_node("ReduceSum", ["t2_terms", "axis1"], ["t2"], keepdims=0),
        helper.make_node("Sub", ["z", "recon"], ["residual"]),
        helper.make_node("Mul", ["residual", "residual"], [CONTRIB]),
        helper.make_node("ReduceMean", [CONTRIB, "axis1"], ["q"], keepdims=0),
        helper.make_node("Add", ["q", "t2"], [SCORE]),
    ]
    inits += [_const("pca_mean", model.mean_), _const("pca_components_t", comps.T), _const("pca_components", comps),
              _const("t2_scale", t2_weight / (k * model.explained_variance_)),
              numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1")]
    return _model(nodes, inits, n_features, contributions=True, name="pca_t2_q")


def autoencoder(mean: npt.NDArray[np.float64], scale: npt.NDArray[np.float64], model: MLPRegressor,
                n_features: int) -> onnx.ModelProto:
    nodes, inits = _standardize(mean, scale)
    act = {"relu": "Relu", "tanh": "Tanh", "logistic": "Sigmoid", "identity": None}[model.activation]
    h = "z"
    last = len(model.coefs_) - 1
    for i, (w, b) in enumerate(zip(model.coefs_, model.intercepts_, strict=True)):
        inits += [_const(f"w{i}", w), _const(f"b{i}", b)]
        nodes += [helper.make_node("MatMul", [h, f"w{i}"], [f"l{i}_mm"]),
                  helper.make_node("Add", [f"l{i}_mm", f"b{i}"], [f"l{i}"])]
        h = f"l{i}"
        if i < last and act is not None:
            nodes.append(helper.make_node(act, [h], [f"a{i}"]))
            h = f"a{i}"
    inits.append(numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1"))
    _residual_score(h, nodes)
    return _model(nodes, inits, n_features, contributions=True, name="autoencoder")


def knn(mean: npt.NDArray[np.float64], scale: npt.NDArray[np.float64], prototypes: npt.NDArray[np.float64],
        n_features: int) -> onnx.ModelProto:
    """score = Euclidean distance, in standardized units, to the nearest training prototype;
    contributions = squared difference to that prototype per feature (which features made it far).

    The nearest prototype is found with the expansion |z|^2 - 2 z.p + |p|^2 (one MatMul for all
    prototypes); the score is then the exact distance to the one found, so float32 cancellation in the
    expansion can at worst pick a near-tie, never report a distance that no prototype has."""
    nodes, inits = _standardize(mean, scale)
    protos = prototypes.astype(np.float32)
    nodes += [
        helper.make_node("MatMul", ["z", "protos_t"], ["cross"]),
        helper.make_node("Mul", ["cross", "minus_two"], ["cross2"]),
        helper.make_node("Add", ["cross2", "protos_sq"], ["partial"]),  # |z|^2 is the same for every prototype
        helper.make_node("ArgMin", ["partial"], ["nearest_idx"], axis=1, keepdims=0),
        helper.make_node("Gather", ["protos", "nearest_idx"], ["nearest"], axis=0),
        helper.make_node("Sub", ["z", "nearest"], ["residual"]),
        helper.make_node("Mul", ["residual", "residual"], [CONTRIB]),
        helper.make_node("ReduceSum", [CONTRIB, "axis1"], ["d2"], keepdims=0),
        helper.make_node("Sqrt", ["d2"], [SCORE]),
    ]
    inits += [_const("protos", protos), _const("protos_t", protos.T),
              _const("protos_sq", (protos.astype(np.float64) ** 2).sum(axis=1)), _const("minus_two", -2.0),
              numpy_helper.from_array(np.array([1], dtype=np.int64), "axis1")]
    return _model(nodes, inits, n_features, contributions=True, name="knn_distance")


def skl2onnx_isolation_forest(model: IsolationForest, n_features: int) -> onnx.ModelProto:
    """skl2onnx's own converter (the slow reference the benchmark compares against)."""
    from skl2onnx import to_onnx  # type: ignore[import-untyped]

    sample = np.zeros((1, n_features), dtype=np.float32)
    proto: onnx.ModelProto = to_onnx(model, sample, target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET})
    return proto
