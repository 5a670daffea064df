"""Smart Turn v3 (a Whisper-tiny encoder with an end-of-turn head, int8 QDQ ONNX) into a transformers folder.

Smart Turn v3 (Daily, shipped in PyPI's `pipecat-ai`, BSD-2-Clause) is Whisper-tiny's encoder fine-tuned to hear
whether a speaker has finished their turn, followed by an attention-pooling head. Its ONNX export is statically
quantised in QDQ form: every weight is an int8 (biases: int32) initializer read through a `DequantizeLinear` node,
and activations pass through `QuantizeLinear`/`DequantizeLinear` pairs. The float weights are recovered exactly as
the graph computes them, `scale * (q - zero_point)` along the node's axis. Names:

- named initializers (`inner.encoder.conv1.weight_quantized`, `inner.encoder.layers.0.fc1.bias`, ...) carry the
  PyTorch module names of transformers' `WhisperEncoder` under the prefix `inner.encoder.`;
- the linear layers' weights feed `MatMul` nodes as `[in, out]` matrices (transposed into `nn.Linear`'s `[out, in]`)
  under anonymous names (`onnx::MatMul_453`, `val_17`; v3.2 leaves the nodes anonymous too). A MatMul belongs to the
  module whose bias the `Add` after it (through the activation's quantise/dequantise pair) adds. Whisper's `k_proj`
  has no bias: it is the MatMul that reads the same input as a layer's q_proj and v_proj.

The encoder is written as an encoder-only `WhisperEncoder` folder (config with `architectures: ["WhisperEncoder"]`,
fp32 safetensors, an 80-mel 8 s `WhisperFeatureExtractor`), which `WhisperEncoder.from_pretrained` and
`MoWEForConditionalGeneration.from_components` load strictly. The head (`pool_attention.*`, `classifier.*`) goes to
`smart_turn_head.safetensors` beside it; `smart_turn_probability` runs it. `float_reference_graph` removes the
activation quantisation from the ONNX graph, so onnxruntime computes what the float weights compute, layer by layer:
the tests compare the two.
"""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

ENCODER_PREFIX = "inner.encoder."
HEAD_PREFIXES = ("inner.pool_attention.", "inner.classifier.")
HEAD_FILE = "smart_turn_head.safetensors"
WHISPER_HEAD_DIM = 64  # every Whisper size has 64-wide attention heads (tiny 384 / 6, base 512 / 8, ...)
_QDQ = ("QuantizeLinear", "DequantizeLinear")


def import_onnx():
    """The `onnx` package, or an ImportError that says how to install it."""
    try:
        import onnx
    except ImportError as error:
        raise ImportError(
            "Converting an ONNX model needs the `onnx` package: `pip install 'mowe-audio[smart-turn]'` (from a "
            "checkout: `pip install '.[smart-turn]'`) or `pip install onnx`."
        ) from error
    return onnx


def _dequantise(q: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None, axis: int) -> np.ndarray:
    """`scale * (q - zero_point)` as ONNX's DequantizeLinear computes it: per tensor, or per channel along `axis`."""
    shape = [1] * q.ndim
    if scale.ndim == 1 and q.ndim > 1:
        shape[axis % q.ndim] = -1
    else:
        shape = list(scale.shape)
    zero = 0.0 if zero_point is None else zero_point.astype(np.float32).reshape(shape)
    return (q.astype(np.float32) - zero) * scale.astype(np.float32).reshape(shape)


class _Graph:
    """An ONNX graph's initializers (as numpy), producers and consumers, with the dequantised weights."""

    def __init__(self, model: Any):
        from onnx import numpy_helper

        self.graph = model.graph
        self.initializers = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.producer = {out: node for node in model.graph.node for out in node.output}
        self.consumers: dict[str, list] = {}
        for node in model.graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        # DequantizeLinear outputs whose input is a constant: the float weights, keyed by that output's name.
        self.weights: dict[str, tuple[str, np.ndarray]] = {}
        for node in model.graph.node:
            if node.op_type == "DequantizeLinear" and node.input[0] in self.initializers:
                axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
                zero_point = self.initializers.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
                value = _dequantise(
                    self.initializers[node.input[0]], self.initializers[node.input[1]], zero_point, axis
                )
                self.weights[node.output[0]] = (node.input[0], value)

    def source(self, name: str) -> str:
        """`name` followed back through activation quantise/dequantise nodes to the tensor they carry."""
        node = self.producer.get(name)
        while node is not None and node.op_type in _QDQ and node.input[0] not in self.initializers:
            name = node.input[0]
            node = self.producer.get(name)
        return name

    def bias_after(self, name: str) -> str | None:
        """The named float bias that the Add after tensor `name` (through quantise/dequantise nodes) adds."""
        frontier = [name]
        while frontier:
            for node in self.consumers.get(frontier.pop(), []):
                if node.op_type in _QDQ:
                    frontier.append(node.output[0])
                elif node.op_type == "Add":
                    biases = [i for i in node.input if i.endswith(".bias")]
                    return biases[0] if biases else None
        return None


def _strip(name: str) -> str:
    return name.removesuffix("_quantized")


def smart_turn_state_dicts(model: Any) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """`(encoder, head)` float weights of a Smart Turn v3 ONNX model (an `onnx.ModelProto`): the encoder's under
    `WhisperEncoder`'s own names (`conv1.weight`, `layers.0.self_attn.q_proj.weight`, ...), the head's under
    `pool_attention.*` / `classifier.*`.

    Raises:
        ValueError: a MatMul weight that no rule names, or a graph without Smart Turn's encoder.
    """
    graph = _Graph(model)
    quantisation_parameters = {n for node in graph.graph.node if node.op_type in _QDQ for n in node.input[1:]}
    named: dict[str, np.ndarray] = {}
    for name, value in graph.initializers.items():
        if name.startswith("inner.") and value.dtype.kind == "f" and name not in quantisation_parameters:
            named[name] = value.astype(np.float32)
    for initializer, value in graph.weights.values():
        if initializer.startswith("inner."):
            named[_strip(initializer)] = value

    matmuls: dict[str, str | None] = {}  # weight tensor -> module name (None: not yet known)
    inputs: dict[str, str] = {}
    for node in graph.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in graph.weights:
            continue
        bias = graph.bias_after(node.output[0])
        module = bias.removesuffix(".bias") if bias else None
        matmuls[node.input[1]] = module
        inputs[node.input[1]] = graph.source(node.input[0])
    for weight, module in list(matmuls.items()):
        if module is not None:
            continue
        siblings = {matmuls[w] for w, source in inputs.items() if source == inputs[weight] and matmuls[w]}
        attention = {s.rsplit(".", 1)[0] for s in siblings if s.endswith((".q_proj", ".v_proj"))}
        if len(attention) != 1 or len(siblings) != 2:
            raise ValueError(
                f"Cannot tell which module the ONNX MatMul weight {weight!r} belongs to (no bias Add follows it, and "
                "it is not the bias-free k_proj beside a q_proj and v_proj); this converter reads Smart Turn v3 "
                "exports (pipecat-ai's smart-turn-v3.x ONNX files)."
            )
        matmuls[weight] = f"{attention.pop()}.k_proj"
    for weight, module in matmuls.items():
        named[f"{module}.weight"] = np.ascontiguousarray(graph.weights[weight][1].T)

    encoder = {k.removeprefix(ENCODER_PREFIX): v for k, v in named.items() if k.startswith(ENCODER_PREFIX)}
    head = {k.removeprefix("inner."): v for k, v in named.items() if k.startswith(HEAD_PREFIXES)}
    if "embed_positions.weight" not in encoder or "conv1.weight" not in encoder:
        raise ValueError(
            "This ONNX model holds no Whisper encoder under `inner.encoder.` (no `inner.encoder.conv1` or "
            "`embed_positions` weights); this converter reads Smart Turn v3 exports."
        )
    return encoder, head


def _num_layers(encoder: dict[str, np.ndarray]) -> int:
    return len({k.split(".")[1] for k in encoder if k.startswith("layers.")})


def whisper_encoder_config(encoder: dict[str, np.ndarray]):
    """The `WhisperConfig` of an encoder state dict: sizes from the weights' shapes, heads by Whisper's 64-wide
    rule, `architectures = ["WhisperEncoder"]` (an encoder-only folder)."""
    from transformers import WhisperConfig

    positions, d_model = encoder["embed_positions.weight"].shape
    config = WhisperConfig(
        d_model=int(d_model),
        num_mel_bins=int(encoder["conv1.weight"].shape[1]),
        encoder_layers=_num_layers(encoder),
        encoder_attention_heads=int(d_model) // WHISPER_HEAD_DIM,
        encoder_ffn_dim=int(encoder["layers.0.fc1.weight"].shape[0]),
        max_source_positions=int(positions),
    )
    config.architectures = ["WhisperEncoder"]
    return config


def convert_smart_turn(onnx_file: str | os.PathLike, output_dir: str | os.PathLike) -> Path:
    """Write an encoder-only `WhisperEncoder` folder (fp32 safetensors, config, 80-mel feature extractor with
    `chunk_length` = the encoder's window) and `smart_turn_head.safetensors` from a Smart Turn v3 ONNX file.

    Raises:
        ImportError: the `onnx` package is missing.
        ValueError: the file is not a Smart Turn v3 export, or its weights do not fill `WhisperEncoder` exactly.
    """
    onnx = import_onnx()
    from safetensors.torch import save_file
    from transformers import WhisperFeatureExtractor
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    try:
        model = onnx.load(str(onnx_file))
    except Exception as error:  # onnx raises DecodeError and friends for a file that is not an ONNX model
        raise ValueError(
            f"{onnx_file} is not a readable ONNX model ({error}); pass a Smart Turn v3 .onnx file."
        ) from error
    encoder, head = smart_turn_state_dicts(model)
    config = whisper_encoder_config(encoder)
    with torch.device("meta"):
        module = WhisperEncoder(config)
    expected = set(module.state_dict())
    if set(encoder) != expected:
        raise ValueError(
            f"{onnx_file}'s encoder weights do not fill transformers' WhisperEncoder: missing "
            f"{sorted(expected - set(encoder))[:5]}, unexpected {sorted(set(encoder) - expected)[:5]}."
        )
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32)) for k, v in encoder.items()}
    module.load_state_dict(tensors, strict=True, assign=True)
    output_dir = Path(output_dir)
    module.save_pretrained(output_dir)
    seconds = 2 * config.max_source_positions // 100  # 2 mel frames per position, 100 mel frames per second
    WhisperFeatureExtractor(feature_size=config.num_mel_bins, chunk_length=seconds).save_pretrained(output_dir)
    save_file({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in head.items()}, str(output_dir / HEAD_FILE))
    return output_dir


def smart_turn_probability(hidden: torch.Tensor, head: dict[str, torch.Tensor]) -> torch.Tensor:
    """Smart Turn's end-of-turn probability `(batch,)` from its encoder's last hidden state `(batch, frames, d)` and
    the head's weights (`smart_turn_head.safetensors`): attention pooling over frames (Linear -> tanh -> Linear,
    softmax over time), then Linear -> LayerNorm -> GELU -> Linear -> GELU -> Linear -> sigmoid."""
    f = torch.nn.functional
    scores = f.linear(
        torch.tanh(f.linear(hidden, head["pool_attention.0.weight"], head["pool_attention.0.bias"])),
        head["pool_attention.2.weight"],
        head["pool_attention.2.bias"],
    )
    pooled = (scores.softmax(dim=1) * hidden).sum(dim=1)
    x = f.linear(pooled, head["classifier.0.weight"], head["classifier.0.bias"])
    x = f.gelu(f.layer_norm(x, x.shape[-1:], head["classifier.1.weight"], head["classifier.1.bias"]))
    x = f.gelu(f.linear(x, head["classifier.4.weight"], head["classifier.4.bias"]))
    return torch.sigmoid(f.linear(x, head["classifier.6.weight"], head["classifier.6.bias"]))[:, 0]


def float_reference_graph(model: Any) -> tuple[Any, list[str]]:
    """A copy of a Smart Turn v3 ONNX model without activation quantisation, and the names of its encoder's
    per-layer outputs made graph outputs.

    Every `QuantizeLinear` -> `DequantizeLinear` pair on an activation is removed (its consumers read the float
    tensor); weights keep their `DequantizeLinear`, so onnxruntime computes in float what the dequantised weights
    compute. The extra outputs, in order: each encoder layer's output (the input of the next layer's
    `self_attn_layer_norm`, the last one's the input of the final `layer_norm`), then the final `layer_norm`'s output
    (the encoder's last hidden state).
    """
    from onnx import helper

    model = copy.deepcopy(model)
    graph = model.graph
    initializers = {t.name for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    rename: dict[str, str] = {}
    dropped = set()
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] in initializers:
            continue
        quantise = producer.get(node.input[0])
        if quantise is None or quantise.op_type != "QuantizeLinear":
            continue
        rename[node.output[0]] = quantise.input[0]
        dropped.update({id(node), id(quantise)})
    for node in graph.node:
        for i, name in enumerate(node.input):
            while name in rename:
                name = rename[name]
            node.input[i] = name
    for output in graph.output:
        while output.name in rename:
            output.name = rename[output.name]
    kept = [n for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(kept)

    def layer_norm(scale: str):
        return next(n for n in graph.node if n.op_type == "LayerNormalization" and n.input[1] == scale)

    layers = 1 + max(int(m.group(1)) for t in initializers if (m := re.match(r"inner\.encoder\.layers\.(\d+)\.", t)))
    names = [layer_norm(f"inner.encoder.layers.{i}.self_attn_layer_norm.weight").input[0] for i in range(1, layers)]
    final = layer_norm("inner.encoder.layer_norm.weight")
    names += [final.input[0], final.output[0]]
    graph.output.extend(helper.make_empty_tensor_value_info(name) for name in names)
    return model, names


__all__ = [
    "HEAD_FILE",
    "convert_smart_turn",
    "float_reference_graph",
    "import_onnx",
    "smart_turn_probability",
    "smart_turn_state_dicts",
    "whisper_encoder_config",
]
