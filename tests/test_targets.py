"""Deployment target files: typed, validated, unknown names listed."""

from __future__ import annotations

import pytest

from export.targets import TARGETS_DIR, TargetError, known_targets, load_target


def test_shipped_targets_load():
    assert {"android", "ios", "linux-x86_64"} <= set(known_targets())
    android = load_target("android")
    assert android.executorch.linear == "8da4w" and android.executorch.embedding == "int8"
    assert android.onnx.linear == "int4" and android.quantized
    assert android.gates.min_top1_agreement >= 0.95 and android.gates.min_pte_size_reduction >= 3
    ios = load_target("ios")
    assert ios.executorch.coreml and ios.onnx is None
    linux = load_target("linux-x86_64")
    assert not linux.quantized and linux.executorch and linux.onnx
    assert android.onnx.clients == ("onnxruntime-genai",) == linux.onnx.clients
    web = load_target("web")  # the android ONNX recipe for transformers.js, no .pte
    assert web.executorch is None and web.onnx.clients == ("transformers.js",)
    assert (web.onnx.linear, web.onnx.block_size, web.onnx.keep_8bit) == (
        android.onnx.linear, android.onnx.block_size, android.onnx.keep_8bit)


def test_unknown_target_lists_known_ones():
    with pytest.raises(TargetError, match="known targets: android, ios, linux-x86_64, web"):
        load_target("windows-phone")


@pytest.mark.parametrize(
    "body, message",
    [
        ('max_context = 1024\n[executorch]\nlinear = "2bit"\n[gates]\n', "linear = '2bit'"),
        ("[executorch]\ncolour = 1\n", "unknown key"),
        ("description='x'\nmax_context=64\nprefill_chunk=8\nmax_draft=4\ndraft_tokens='auto'\n[gates]\n"
         "min_top1_agreement=0.9\nmax_mean_kl=1\nmax_accepted_length_drop=0.1\n", "no format"),
        ("this is not toml", "not valid TOML"),
        ('[onnx]\nclients = ["ollama"]\n[gates]\n', r"clients = 'ollama'; expected one of \['onnxruntime-genai', 'transformers.js'\]"),
    ],
)
def test_bad_target_files_are_refused(tmp_path, body, message):
    (tmp_path / "bad.toml").write_text(body)
    with pytest.raises(TargetError, match=message):
        load_target("bad", tmp_path)


def test_wide_models_get_the_wide_recipe():
    """android: the demo's 128-wide layers keep their 8-bit exceptions and int8 tables; real
    widths (E4B 2560) quantize every linear to 4 bits and the tables to int4."""
    et = load_target("android").executorch
    narrow, wide = et.recipe(128), et.recipe(2560)
    assert narrow == {"linear": "8da4w", "group_size": 32, "embedding": "int8", "keep_8bit": ["lm_head", "self_attn", "per_layer"]}
    assert wide == {"linear": "8da4w", "group_size": 32, "embedding": "int4", "keep_8bit": []}
    assert load_target("linux-x86_64").executorch.recipe(2560) is None  # fp32


def test_wide_models_get_the_fast_onnx_recipe():
    """android's ONNX graphs: the demo keeps HQQ, its 8-bit exceptions and int8 tables; real
    widths get every linear at 4 bits by symmetric round-to-nearest with int8 compute
    (rtn-a8) and int4 tables."""
    ox = load_target("android").onnx
    assert ox.recipe(128) == {"block_size": 32, "keep_8bit": ["lm_head", "self_attn", "per_layer"], "method": "hqq",
                              "embedding": "int8", "linear": "int4"}
    assert ox.recipe(2560) == {"block_size": 32, "keep_8bit": [], "method": "rtn-a8", "embedding": "int4",
                               "linear": "int4"}
    assert load_target("linux-x86_64").onnx.recipe(2560) is None  # fp32


def test_unknown_onnx_table_scheme_is_refused(tmp_path):
    text = (TARGETS_DIR / "android.toml").read_text().replace('wide_embedding = "int4"', 'wide_embedding = "int2"')
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(TargetError, match=r"wide_embedding = 'int2'; expected one of \['fp32', 'int8', 'int4'\]"):
        load_target("bad", tmp_path)


def test_unknown_onnx_method_is_refused(tmp_path):
    text = (TARGETS_DIR / "android.toml").read_text().replace('wide_method = "rtn-a8"', 'wide_method = "gptq"')
    (tmp_path / "bad.toml").write_text(text)
    with pytest.raises(TargetError, match=r"wide_method = 'gptq'; expected one of \['hqq', 'rtn-a8'\]"):
        load_target("bad", tmp_path)
