"""export.tflite_compact (smaller int8 TFLite: weight-only int8 for the float-kept layers, shared vectors) and
export.tflite_size (where a model's bytes go), on a small Keras model whose last layer has a 64x64 weight."""

from __future__ import annotations

import numpy as np
import pytest

SIZE = 16


@pytest.fixture(scope="module")
def models():
    import keras
    from keras import layers, ops

    from export import converters

    keras.utils.set_random_seed(0)
    image = keras.Input((SIZE, SIZE, 1), name="image")
    h = layers.Conv2D(8, 3, padding="same", activation="relu")(image)
    h = layers.Conv2D(16, 3, padding="same", activation="relu")(h)
    h = layers.GlobalAveragePooling2D()(h)
    h = layers.Dense(64, activation="relu")(h)
    # A last layer (its output reaches the score through arithmetic only): int8_scope="mixed" keeps it float32.
    whitened = layers.Dense(64, use_bias=False, name="whiten")(h)
    score = ops.sum(ops.square(whitened), axis=-1)
    model = keras.Model(image, {"score": score})
    model.export_image_size, model.export_outputs = SIZE, ["score"]
    rng = np.random.default_rng(0)
    calib = rng.uniform(0, 1, (64, SIZE, SIZE, 1)).astype(np.float32)
    x = rng.uniform(0, 1, (32, SIZE, SIZE, 1)).astype(np.float32)
    plain = converters.to_tflite(model, "int8", calib, compact=False)  # the converter's own bytes
    compacted = converters.to_tflite(model, "int8", calib)
    return {"keras": model, "plain": plain, "compact": compacted, "x": x}


def _ops(content: bytes):
    from export.tflite_compact import _op_name
    from export.tflite_size import _schema

    schema = _schema()
    model = schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
    return schema, model, [(_op_name(schema, model, op), op) for op in model.subgraphs[0].operators]


def test_float_layer_weights_are_stored_int8_and_computed_in_float(models):
    from export import converters
    from export.tflite_size import breakdown

    schema, model, ops = _ops(models["compact"])
    tensors = model.subgraphs[0].tensors
    producer = {int(o): (name, op) for name, op in ops for o in op.outputs}
    rewritten = []
    for name, op in ops:
        if name != "FULLY_CONNECTED":
            continue
        weight = int(op.inputs[1])
        if weight in producer and producer[weight][0] == "DEQUANTIZE":
            source = tensors[int(producer[weight][1].inputs[0])]
            assert source.type == schema.TensorType.INT8
            assert source.quantization.quantizedDimension in (0, 1) and len(source.quantization.scale) == 64
            assert tensors[weight].type == schema.TensorType.FLOAT32  # the layer computes in float32
            assert tensors[int(op.inputs[0])].type == schema.TensorType.FLOAT32
            assert len(model.buffers[tensors[weight].buffer].data or []) == 0  # no float32 copy left
            rewritten.append(op)
    assert len(rewritten) == 1, "the 64x64 float32 whitening weight should be the one weight-only int8 tensor"

    before, after = breakdown(models["plain"]), breakdown(models["compact"])
    assert before["constants"]["float32"] >= 64 * 64 * 4  # the float32 weight was there ...
    assert after["constants"].get("float32", 0) < 64 * 64  # ... and is gone
    assert after["bytes"] <= before["bytes"] - 64 * 64 * 2  # 16 KiB float32 -> 4 KiB int8 (+ 64 scales)
    meta = {m.name: bytes(model.buffers[m.buffer].data).rstrip(b"\x00") for m in model.metadata}
    assert meta[b"min_runtime_version"] == b"2.7.0"  # per-channel int8 DEQUANTIZE

    x = models["x"]
    ref = models["keras"](x)["score"].numpy()
    plain, compact = converters.run_tflite(models["plain"], x)["score"], converters.run_tflite(models["compact"], x)["score"]
    # Only the stored weights moved (half an int8 step per channel): the score stays close to the float-weight model.
    assert np.max(np.abs(compact - plain) / np.maximum(np.abs(plain), 1e-6)) < 0.02
    assert np.max(np.abs(compact - ref) / np.maximum(np.abs(ref), 1e-6)) < 0.2


def test_channel_axis_is_the_one_with_the_smaller_output_error(models):
    """With calibration images, each weight is quantized along the channel axis (output or input channels)
    whose model outputs stay closest to the float32-weight model's; without, along the output channels."""
    from export.tflite_compact import _candidates, _output_error, _outputs, _rewrite, compact
    from export.tflite_size import _schema

    schema = _schema()
    calib = models["x"]
    ((key, options),) = _candidates(schema, models["plain"], 1024).items()
    assert options == (0, 1)
    reference = _outputs(models["plain"], calib)
    errors = {a: _output_error(reference, _outputs(_rewrite(schema, models["plain"], 1024, {key: a}), calib))
              for a in options}
    assert errors[0] != errors[1]  # the axis matters

    def axis_of(content):
        model = schema.ModelT.InitFromPackedBuf(bytearray(content), 0)
        (dim,) = [t.quantization.quantizedDimension for t in model.subgraphs[0].tensors if (t.name or b"").endswith(b"/int8")]
        return dim

    assert axis_of(compact(models["plain"], calibration=calib)) == min(errors, key=errors.get)
    assert axis_of(compact(models["plain"])) == 0
    with pytest.raises(ValueError, match="calibration"):
        compact(models["plain"], calibration=np.zeros((0, SIZE, SIZE, 1), np.float32))


def test_sharing_vectors_is_lossless(models):
    from export import converters
    from export.tflite_compact import compact

    shared = compact(models["plain"], weight_only_int8=False)
    assert len(shared) < len(models["plain"])  # the per-channel zero points of the int8 layers repeat
    x = models["x"]
    np.testing.assert_array_equal(converters.run_tflite(shared, x)["score"], converters.run_tflite(models["plain"], x)["score"])
    assert compact(shared, weight_only_int8=False) == shared  # nothing more to share


def test_bad_input_is_refused():
    from export.tflite_compact import compact
    from export.tflite_size import breakdown, main

    for junk in (b"", b"not a model at all", b"\x00" * 64):
        with pytest.raises(ValueError, match="not a TFLite flatbuffer"):
            compact(junk)
        with pytest.raises(ValueError, match="not a TFLite flatbuffer"):
            breakdown(junk)
    with pytest.raises(ValueError, match="min_elements"):
        compact(b"\x00\x00\x00\x00TFL3", min_elements=0)
    assert main([]) == 2


def test_size_breakdown_adds_up(models, tmp_path, capsys):
    from export.tflite_size import breakdown, main

    b = breakdown(models["compact"])
    assert b["bytes"] == len(models["compact"])
    assert b["constant_bytes"] + sum(b["metadata"].values()) + b["other_bytes"] == b["bytes"]
    assert b["constants"]["int8"] >= 8 * 9 * 16 + 64 * 16 + 64 * 64  # conv2, dense and the whitening weight
    assert b["largest"][0][3] == max(row[3] for row in b["largest"])
    path = tmp_path / "m.tflite"
    path.write_bytes(models["compact"])
    assert main([str(path)]) == 0
    assert "constants" in capsys.readouterr().out
    (tmp_path / "bad.tflite").write_bytes(b"junk")
    assert main([str(tmp_path / "bad.tflite")]) == 1


def test_every_layer_op_runs_with_int8_stored_weights():
    """CONV_2D, DEPTHWISE_CONV_2D, TRANSPOSE_CONV and FULLY_CONNECTED read a DEQUANTIZE output as their weight,
    with and without LiteRT's default delegate (XNNPACK): a float32 model with every weight rewritten."""
    import keras
    from ai_edge_litert.interpreter import Interpreter, OpResolverType
    from keras import layers, ops

    from export import converters
    from export.tflite_compact import _op_name, compact
    from export.tflite_size import _schema

    keras.utils.set_random_seed(1)
    image = keras.Input((SIZE, SIZE, 1), name="image")
    h = layers.Conv2D(16, 3, strides=2, padding="same", activation="relu")(image)
    h = layers.DepthwiseConv2D(3, padding="same")(h)
    h = layers.Conv2DTranspose(8, 3, strides=2, padding="same")(h)
    v = layers.Dense(8)(layers.GlobalAveragePooling2D()(h))
    model = keras.Model(image, {"score": ops.mean(ops.square(h - image), axis=(1, 2, 3)) + ops.sum(v, axis=-1)})
    model.export_image_size, model.export_outputs = SIZE, ["score"]
    flat = converters.to_tflite(model, "none")
    x = np.random.default_rng(1).uniform(0, 1, (16, SIZE, SIZE, 1)).astype(np.float32)
    small = compact(flat, min_elements=16, calibration=x)
    schema = _schema()
    graph = schema.ModelT.InitFromPackedBuf(bytearray(small), 0)
    producer = {int(o): _op_name(schema, graph, op) for op in graph.subgraphs[0].operators for o in op.outputs}
    fed = {_op_name(schema, graph, op) for op in graph.subgraphs[0].operators
           if len(op.inputs) > 1 and producer.get(int(op.inputs[1])) == "DEQUANTIZE"}
    assert fed == {"CONV_2D", "DEPTHWISE_CONV_2D", "TRANSPOSE_CONV", "FULLY_CONNECTED"}
    from export.tflite_size import breakdown

    before, after = breakdown(flat)["constants"], breakdown(small)["constants"]
    assert after["int8"] >= (16 * 9 + 16 * 9 + 8 * 9 * 16 + 8 * 8) and after["float32"] < before["float32"] / 3
    assert len(small) < len(flat)
    for resolver in (OpResolverType.AUTO, OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES):
        a = Interpreter(model_content=flat, experimental_op_resolver_type=resolver).get_signature_runner()(image=x)
        b = Interpreter(model_content=small, experimental_op_resolver_type=resolver).get_signature_runner()(image=x)
        np.testing.assert_allclose(b["score"], a["score"], rtol=2e-2, atol=1e-3)
