"""Every built-in component, by kind and name: where it lives and its one-line summary, without importing it.

`mmfuse list` and the config's name checks (`registry.known_names`) read this table, so they answer without
importing torch. tests/test_names.py imports every registry and checks that the table agrees with them
exactly: adding a component is its file plus its line here (the test's failure message prints the line).

Kinds are the registries' `kind` strings (`Registry("fusion")`); a target is `"module:attribute"`; a summary
is the first line of the component's docstring.
"""

from __future__ import annotations

from typing import NamedTuple


class Entry(NamedTuple):
    """Where a registered component lives and what it is."""

    target: str  # "package.module:ClassName"
    summary: str  # the first line of its docstring


BUILTIN: dict[str, dict[str, Entry]] = {
    "encoder": {
        "conv": Entry(
            "mmfuse.encoders.conv:ConvImageEncoder",
            "A small CNN trained from scratch (by default Santoro et al. 2017's): spatial tokens on a square grid.",
        ),
        "embedding": Entry(
            "mmfuse.encoders.embedding:EmbeddingEncoder",
            "Precomputed vectors of size `dim`, through an optional Linear (+ LayerNorm) projection.",
        ),
        "hf_text": Entry(
            "mmfuse.encoders.hf_text:HFTextEncoder",
            "A Hugging Face text model: `last_hidden_state` as tokens plus a CLS, mean or pooler vector.",
        ),
        "tabular": Entry(
            "mmfuse.encoders.tabular:TabularEncoder",
            "A table row: one token per numeric or categorical column plus a pooled [CLS] vector (FT-Transformer).",
        ),
        "timm": Entry(
            "mmfuse.encoders.timm_image:TimmImageEncoder",
            "Any timm model as an image encoder; by default the packaged ImageNet EfficientNet-Lite0 (1280-d).",
        ),
        "torchvision": Entry(
            "mmfuse.encoders.torchvision_image:TorchvisionImageEncoder",
            "Any torchvision classification model (ResNet, EfficientNet, ConvNeXt, ViT, ...) as an image encoder.",
        ),
    },
    "fusion": {
        "bilinear": Entry(
            "mmfuse.fusion.bilinear:BilinearFusion",
            'Low-rank bilinear pooling of the pooled vectors: MLB (`variant="mlb"`) or MFB (`variant="mfb"`).',
        ),
        "co_attention": Entry(
            "mmfuse.fusion.co_attention:CoAttentionFusion",
            "Co-attention transformer over both token sets, pooled: `fc_out([mean_a(z_a), mean_b(z_b)])`.",
        ),
        "concat": Entry(
            "mmfuse.fusion.concat:ConcatFusion",
            "Concatenate the pooled features (in `input_dims` order) and apply one linear layer.",
        ),
        "cross_attention": Entry(
            "mmfuse.fusion.cross_attention:CrossAttentionFusion",
            "Multi-head attention from a query modality over the other modality's tokens, pooled over queries.",
        ),
        "film": Entry(
            "mmfuse.fusion.film:FiLMFusion",
            "`fc_out(gamma * target + beta)` with `gamma, beta = split(fc(condition))`.",
        ),
        "gated": Entry(
            "mmfuse.fusion.gated:GatedFusion",
            "`fc_out(sigmoid(fc_g(x_g)) * fc_o(x_o))`: the gating modality `g` scales the other modality `o`.",
        ),
        "lmf": Entry(
            "mmfuse.fusion.lmf:LowRankFusion",
            "Low-rank tensor fusion (LMF): `fused_o = sum_r prod_m ([h_m, 1] . factors_m[r, :, o]) + bias_o`.",
        ),
        "relation": Entry(
            "mmfuse.fusion.relation:RelationFusion",
            "Relation Network: `fused = f(sum_{i,j} g([o_i; o_j; q]))` over all ordered pairs of grid cells.",
        ),
        "spatial_film": Entry(
            "mmfuse.fusion.spatial_film:SpatialFiLMFusion",
            "FiLM on the token grid: `fused = fc(maxpool(relu(conv1x1([x_N; xy]))))`, x_N after N FiLM-ed conv blocks.",
        ),
        "sum": Entry(
            "mmfuse.fusion.sum:SumFusion",
            "Project each modality to the output size and add: `sum_m (W_m x_m + b_m)`.",
        ),
        "tensor": Entry(
            "mmfuse.fusion.tensor:TensorFusion",
            "Tensor fusion (TFN): `fc_out(flatten([h_1, 1] ⊗ [h_2, 1] ⊗ ...))` with `h_m = proj_m(x_m)`.",
        ),
    },
    "task kind": {
        "binary": Entry(
            "mmfuse.tasks.binary:BinaryTask",
            "Two classes, one logit, BCE-with-logits; labels 0/1, true/false, yes/no or the two class names.",
        ),
        "multiclass": Entry(
            "mmfuse.tasks.multiclass:MulticlassTask",
            "One of C named classes, cross-entropy; classes are inferred from the training labels when not given.",
        ),
        "multilabel": Entry(
            "mmfuse.tasks.multilabel:MultilabelTask",
            'Any subset of C named labels, one BCE logit each; a raw label is a list or a "a|b" string.',
        ),
        "regression": Entry(
            "mmfuse.tasks.regression:RegressionTask",
            "One real-valued target; MSE (default) or L1 loss. Targets are numbers or numeric strings.",
        ),
    },
    "head": {
        "mlp": Entry(
            "mmfuse.tasks.heads:MLPHead",
            "A Linear head, or an MLP when `hidden_dims` is non-empty: (B, D_in) -> (B, C).",
        ),
    },
    "weighting": {
        "cagrad": Entry(
            "mmfuse.mtl.cagrad:CAGrad",
            "Conflict-averse direction: the best worst-case local improvement within a ball around the mean gradient.",
        ),
        "dwa": Entry(
            "mmfuse.mtl.dwa:DynamicWeightAverage",
            "Backward `sum_t w_t L_t` with weights set once per epoch from the loss descent rates.",
        ),
        "equal": Entry(
            "mmfuse.mtl.equal:EqualWeighting",
            "Backward the plain sum of the task losses (every weight is 1).",
        ),
        "gradnorm": Entry(
            "mmfuse.mtl.gradnorm:GradNorm",
            "Learn task weights so that the tasks' gradient norms train at similar relative rates.",
        ),
        "pcgrad": Entry(
            "mmfuse.mtl.pcgrad:PCGrad",
            "Project each task's shared gradient off the gradients it conflicts with, then sum.",
        ),
        "static": Entry(
            "mmfuse.mtl.static:StaticWeighting",
            "Backward `sum_t w_t L_t` with fixed weights from the config.",
        ),
        "uncertainty": Entry(
            "mmfuse.mtl.uncertainty:UncertaintyWeighting",
            "Learned homoscedastic-uncertainty weights: backward `sum_t exp(-s_t) L_t + s_t`.",
        ),
    },
    "balancer": {
        "agm": Entry(
            "mmfuse.balance.agm:AGM",
            "Adaptive Gradient Modulation: per-modality lr multipliers from mono-modal losses against their history.",
        ),
        "modality_dropout": Entry(
            "mmfuse.balance.modality_dropout:ModalityDropout",
            "Drop each modality of each training sample with probability `p`; never drop all of a sample's modalities.",
        ),
        "ogm_ge": Entry(
            "mmfuse.balance.ogm_ge:OGMGE",
            "Slow down the encoders of modalities that already predict well alone (OGM), plus gradient noise (GE).",
        ),
    },
}

# The package whose import registers every component of a kind (what the drift test imports).
PACKAGES: dict[str, str] = {
    "encoder": "mmfuse.encoders",
    "fusion": "mmfuse.fusion",
    "task kind": "mmfuse.tasks",
    "head": "mmfuse.tasks",
    "weighting": "mmfuse.mtl",
    "balancer": "mmfuse.balance",
}


def builtin(kind: str) -> dict[str, Entry]:
    """The built-in components of `kind` ({} for a kind with none listed)."""
    return BUILTIN.get(kind, {})
