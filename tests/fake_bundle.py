"""A two-graph bundle built by hand for the runtime backends' tests (tests/runtime): a vision graph (one MatMul) and
a decoder graph (masked token sum plus image-feature sum, projected), their numpy twins, the manifest, and batches."""

from __future__ import annotations

import numpy as np
import pytest

from pue.bundle import (
    GraphSpec,
    ImagePreprocessing,
    Manifest,
    Prompts,
    SourceCheckpoint,
    TensorSpec,
    TokenizerInfo,
    file_entry,
)

onnx = pytest.importorskip("onnx")

CROPS, SIDE = 2, 4
TOKENS, HIDDEN, DIM, VOCAB = 3, 4, 5, 16
IMAGE_TOKEN_ID, PAD_ID = 7, 0

rng = np.random.default_rng(0)
VISION_WEIGHT = rng.standard_normal((CROPS * 3 * SIDE * SIDE, TOKENS * HIDDEN)).astype(np.float32)
EMBEDDINGS = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
PROJECTION = rng.standard_normal((HIDDEN, DIM)).astype(np.float32)


def vision_graph():
    from onnx import TensorProto, helper, numpy_helper

    nodes = [
        helper.make_node("Reshape", ["pixel_values", "flat_shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "weight"], ["mixed"]),
        helper.make_node("Reshape", ["mixed", "features_shape"], ["image_features"]),
    ]
    initializers = [
        numpy_helper.from_array(np.array([0, -1], dtype=np.int64), "flat_shape"),
        numpy_helper.from_array(np.array([0, TOKENS, HIDDEN], dtype=np.int64), "features_shape"),
        numpy_helper.from_array(VISION_WEIGHT, "weight"),
    ]
    graph = helper.make_graph(
        nodes,
        "vision",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", CROPS, 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["batch", TOKENS, HIDDEN])],
        initializers,
    )
    return _model(graph)


def pooling_nodes() -> list:
    """The fake decoders' pooling: masked sum of the token embeddings (initializer `embeddings`) plus the sum of
    `image_features` over tokens → `pooled` (constants `last_axis` = [-1] and `axis_1` = [1])."""
    from onnx import TensorProto, helper

    return [
        helper.make_node("Gather", ["embeddings", "input_ids"], ["token_embeddings"]),
        helper.make_node("Cast", ["attention_mask"], ["mask_float"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["mask_float", "last_axis"], ["mask_3d"]),
        helper.make_node("Mul", ["token_embeddings", "mask_3d"], ["masked"]),
        helper.make_node("ReduceSum", ["masked", "axis_1"], ["text_sum"], keepdims=0),
        helper.make_node("ReduceSum", ["image_features", "axis_1"], ["image_sum"], keepdims=0),
        helper.make_node("Add", ["text_sum", "image_sum"], ["pooled"]),
    ]


def decoder_graph():
    """sentence_embedding = (sum of masked token embeddings + sum of image_features over tokens) @ projection."""
    from onnx import TensorProto, helper, numpy_helper

    nodes = [*pooling_nodes(), helper.make_node("MatMul", ["pooled", "projection"], ["sentence_embedding"])]
    initializers = [
        numpy_helper.from_array(EMBEDDINGS, "embeddings"),
        numpy_helper.from_array(PROJECTION, "projection"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "last_axis"),
        numpy_helper.from_array(np.array([1], dtype=np.int64), "axis_1"),
    ]
    graph = helper.make_graph(
        nodes,
        "decoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["batch", "image_tokens", HIDDEN]),
        ],
        [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", DIM])],
        initializers,
    )
    return _model(graph)


def _model(graph):
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model


def numpy_vision(pixel_values):
    return (pixel_values.reshape(len(pixel_values), -1) @ VISION_WEIGHT).reshape(-1, TOKENS, HIDDEN)


def numpy_decoder(input_ids, attention_mask, image_features):
    text = (EMBEDDINGS[input_ids] * attention_mask[..., None]).sum(axis=1)
    return (text + image_features.sum(axis=1)) @ PROJECTION


def make_manifest(directory, precision="fp32", target="onnxruntime", external_decoder=False) -> Manifest:
    onnx.save_model(vision_graph(), directory / "vision.onnx")
    if external_decoder:
        onnx.save_model(
            decoder_graph(),
            directory / "decoder.onnx",
            save_as_external_data=True,
            location="decoder.onnx.data",
            size_threshold=64,  # only the weights: onnxruntime needs axes constants inline
        )
    else:
        onnx.save_model(decoder_graph(), directory / "decoder.onnx")
    (directory / "tokenizer.json").write_text("{}")
    external = [file_entry(directory, "decoder.onnx.data")] if external_decoder else []
    return Manifest(
        architecture="tiny",
        precision=precision,
        target=target,
        backend="onnxruntime",
        graphs={
            "vision": GraphSpec(
                file=file_entry(directory, "vision.onnx"),
                inputs=[TensorSpec("pixel_values", "float32", ["batch", CROPS, 3, SIDE, SIDE])],
                outputs=[TensorSpec("image_features", "float32", ["batch", TOKENS, HIDDEN])],
            ),
            "decoder": GraphSpec(
                file=file_entry(directory, "decoder.onnx"),
                inputs=[
                    TensorSpec("input_ids", "int64", ["batch", "seq"]),
                    TensorSpec("attention_mask", "int64", ["batch", "seq"]),
                    TensorSpec("image_features", "float32", ["batch", "image_tokens", HIDDEN]),
                ],
                outputs=[TensorSpec("sentence_embedding", "float32", ["batch", DIM])],
                external_data=external,
            ),
        },
        tile_size=SIDE,
        preprocessing=ImagePreprocessing("anyres", SIDE, SIDE, CROPS, [0.5] * 3, [0.5] * 3, 1 / 255, 3),
        recipe={"name": "e5v"},
        prompts=Prompts("<image>\n", "{text}\n", "<image>{text}\n", "<image>"),
        pooling="last_token",
        tokenizer=TokenizerInfo(file=file_entry(directory, "tokenizer.json"), pad_token_id=PAD_ID),
        image_token_id=IMAGE_TOKEN_ID,
        tokens_per_image=TOKENS,
        embedding_dim=DIM,
        hidden_size=HIDDEN,
        max_seq_len=32,
        default_batch_size=4,
        source_checkpoint=SourceCheckpoint("tiny", "0" * 64, "llava_next"),
    )


def make_batch(image_rows, batch=4, seq=8, seed=1):
    """Image rows: TOKENS image ids then text ids; text rows: text ids only, right-padded."""
    generator = np.random.default_rng(seed)
    input_ids = np.full((batch, seq), PAD_ID, dtype=np.int64)
    attention_mask = np.zeros((batch, seq), dtype=np.int64)
    for row in range(batch):
        length = int(generator.integers(TOKENS + 1, seq + 1))
        ids = generator.choice([i for i in range(1, VOCAB) if i != IMAGE_TOKEN_ID], size=length)
        if row in image_rows:
            ids[:TOKENS] = IMAGE_TOKEN_ID
        input_ids[row, :length] = ids
        attention_mask[row, :length] = 1
    pixel_values = generator.standard_normal((len(image_rows), CROPS, 3, SIDE, SIDE)).astype(np.float32)
    return input_ids, attention_mask, (pixel_values if len(image_rows) else None), np.array(image_rows, dtype=np.int64)


def expected_embeddings(input_ids, attention_mask, pixel_values, image_rows):
    features = np.zeros((len(input_ids), TOKENS, HIDDEN), dtype=np.float32)
    if len(image_rows):
        features[image_rows] = numpy_vision(pixel_values)
    return numpy_decoder(input_ids, attention_mask, features)
