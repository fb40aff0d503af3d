"""The export cache key: any input that changes the exported bytes changes the key."""

from __future__ import annotations

from export import cache


def _pair(tmp_path):
    for d in ("t", "a"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "config.json").write_text("{}")
        (tmp_path / d / "model.safetensors").write_bytes(b"x" * 8)
    return tmp_path / "t", tmp_path / "a"


def test_key_covers_checkpoints_settings_sources_and_toolchain(tmp_path, monkeypatch):
    t, a = _pair(tmp_path)
    base = cache.export_key("executorch", t, a, max_context=1024, max_draft=4)
    assert cache.export_key("executorch", t, a, max_context=1024, max_draft=4) == base
    assert cache.export_key("onnx", t, a, max_context=1024, max_draft=4) != base
    assert cache.export_key("executorch", t, a, max_context=512, max_draft=4) != base
    (t / "model.safetensors").write_bytes(b"y" * 9)  # new weights
    changed = cache.export_key("executorch", t, a, max_context=1024, max_draft=4)
    assert changed != base
    names = {p.name for p in cache.EXPORTER_SOURCES["executorch"]}
    assert {"config.py", "hf_compat.py", "checkpoint.py", "modules.py", "executorch_export.py", "quantize.py"} <= names
    source = tmp_path / "exporter.py"
    source.write_text("a = 1\n")
    monkeypatch.setitem(cache.EXPORTER_SOURCES, "executorch", [source])
    before = cache.export_key("executorch", t, a, max_context=1024, max_draft=4)
    source.write_text("a = 2\n")
    assert cache.export_key("executorch", t, a, max_context=1024, max_draft=4) != before
    assert {"executorch", "torchao", "torch", "transformers"} <= set(cache.TOOLCHAIN)
