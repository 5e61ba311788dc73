"""A tiny bundle the Embedder can run: hand-built graphs, a word-level tokenizer, 8 px tiles; and small held-out
sets for its gates. What the TensorRT fakes (tests/tensorrt_fakes.py) build engines from, and what the registry,
profile and bundle-version tests read."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

TILE, TOKENS, HIDDEN, DIM = 8, 3, 8, 8
CORPUS = [
    "benign tissue with glands and stroma",
    "lymph node with metastatic carcinoma",
    "normal colonic mucosa",
    "strong membranous staining of tumour cells",
    "fatty tissue with thin fibrous septa",
    "necrotic debris",
    "as an immunohistochemistry stain",
    "with more inflammatory cells",
    "at lower magnification",
    "image text composed summary",
]


def _graphs(vocab: int, half_features: bool = False):
    import onnx
    from fake_bundle import pooling_nodes
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    pixels = 3 * TILE * TILE
    last = [helper.make_node("Reshape", ["mixed", "features_shape"], ["image_features"])]
    if half_features:  # a vision graph whose output dtype differs from the decoder's input
        last = [
            helper.make_node("Reshape", ["mixed", "features_shape"], ["features32"]),
            helper.make_node("Cast", ["features32"], ["image_features"], to=TensorProto.FLOAT16),
        ]
    features_type = TensorProto.FLOAT16 if half_features else TensorProto.FLOAT
    vision = helper.make_graph(
        [
            helper.make_node("Reshape", ["pixel_values", "flat_shape"], ["flat"]),
            helper.make_node("MatMul", ["flat", "weight"], ["mixed"]),
            *last,
        ],
        "vision",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, TILE, TILE])],
        [helper.make_tensor_value_info("image_features", features_type, ["batch", TOKENS, HIDDEN])],
        [
            numpy_helper.from_array(np.array([0, -1], np.int64), "flat_shape"),
            numpy_helper.from_array(np.array([0, TOKENS, HIDDEN], np.int64), "features_shape"),
            numpy_helper.from_array(rng.standard_normal((pixels, TOKENS * HIDDEN)).astype(np.float32) / 8, "weight"),
        ],
    )
    # (masked sum of token embeddings + sum of the row's image features) @ projection, L2-normalised
    decoder = helper.make_graph(
        [
            *pooling_nodes(),
            helper.make_node("MatMul", ["pooled", "projection"], ["projected"]),
            helper.make_node("LpNormalization", ["projected"], ["sentence_embedding"], axis=-1, p=2),
        ],
        "decoder",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["batch", "image_tokens", HIDDEN]),
        ],
        [helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", DIM])],
        [
            numpy_helper.from_array(rng.standard_normal((vocab, HIDDEN)).astype(np.float32), "embeddings"),
            numpy_helper.from_array(rng.standard_normal((HIDDEN, DIM)).astype(np.float32), "projection"),
            numpy_helper.from_array(np.array([-1], np.int64), "last_axis"),
            numpy_helper.from_array(np.array([1], np.int64), "axis_1"),
        ],
    )
    models = []
    for graph in (vision, decoder):
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        model.ir_version = 9
        onnx.checker.check_model(model)
        models.append(model)
    return models


def make_tiny_bundle(
    directory: Path, precision: str = "fp32", target: str = "any", half_features: bool = False
) -> Path:
    """An onnxruntime bundle the Embedder can load (CPU), built in well under a second."""
    import onnx
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from pue.bundle import (
        GraphSpec,
        Manifest,
        Prompts,
        SourceCheckpoint,
        TensorSpec,
        TokenizerInfo,
        file_entry,
        write_manifest,
    )
    from pue.gate_set import GATE_MODIFIERS, GATE_TEXTS
    from pue.runtime.preprocess import preprocessing_from_config

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<unk>", "<image>"])
    tokenizer.train_from_iterator(CORPUS + GATE_TEXTS + GATE_MODIFIERS, trainer)
    tokenizer.save(str(directory / "tokenizer.json"))
    vision, decoder = _graphs(tokenizer.get_vocab_size(), half_features)
    onnx.save_model(vision, directory / "vision.onnx")
    onnx.save_model(decoder, directory / "decoder.onnx")
    preprocessing = preprocessing_from_config(
        {
            "image_processor_type": "CLIPImageProcessor",
            "size": {"shortest_edge": TILE},
            "crop_size": {"height": TILE, "width": TILE},
        },
        TILE,
        "single",
        TILE,
        None,
    )
    manifest = Manifest(
        architecture="llava",
        precision=precision,
        target=target,
        backend="onnxruntime",
        graphs={
            "vision": GraphSpec(
                file_entry(directory, "vision.onnx"),
                [TensorSpec("pixel_values", "float32", ["batch", 3, TILE, TILE])],
                [TensorSpec("image_features", "float16" if half_features else "float32", ["batch", TOKENS, HIDDEN])],
            ),
            "decoder": GraphSpec(
                file_entry(directory, "decoder.onnx"),
                [
                    TensorSpec("input_ids", "int64", ["batch", "sequence"]),
                    TensorSpec("attention_mask", "int64", ["batch", "sequence"]),
                    TensorSpec("image_features", "float32", ["batch", "image_tokens", HIDDEN]),
                ],
                [TensorSpec("sentence_embedding", "float32", ["batch", DIM])],
            ),
        },
        tile_size=TILE,
        preprocessing=preprocessing,
        recipe={"name": "e5v"},
        prompts=Prompts(
            image="<image> image summary",
            text="{text} text summary",
            composed="<image> {text} composed summary",
            image_placeholder="<image>",
            image_separator=" ",
        ),
        pooling="last_token",
        tokenizer=TokenizerInfo(file_entry(directory, "tokenizer.json"), pad_token_id=0),
        image_token_id=tokenizer.token_to_id("<image>"),
        tokens_per_image=TOKENS,
        embedding_dim=DIM,
        hidden_size=HIDDEN,
        max_seq_len=128,
        default_batch_size=4,
        source_checkpoint=SourceCheckpoint("tiny-fake", "0" * 64, "llava"),
        versions={"pue": "test"},
    )
    write_manifest(directory, manifest)
    return directory


def heldout_patches(count: int = 8) -> list[Path]:
    """The shipped held-out patches (read straight from the package data folder)."""
    import pue.data

    found = sorted((Path(pue.data.__file__).parent / "patches" / "heldout").glob("*.jpg"))[:count]
    assert len(found) >= 4, "the package's held-out patches are missing"
    return found


def small_gate_set(count: int = 6) -> Any:
    from pue.gate_set import GATE_MODIFIERS, GATE_TEXTS, GateSet, image_sets_of

    images = heldout_patches(count)
    # the fake engines are built with a small --max-seq: the gate texts that fit it
    texts = [text for text in GATE_TEXTS if len(text) < 200]
    return GateSet(images, texts, images[:3], list(GATE_MODIFIERS[:3]), image_sets_of(images))
