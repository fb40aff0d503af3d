"""Read Gemma 4 targets and MTP drafters from local Hugging Face directories, strictly.

Steps:
1. `read_config`: config.json -> the kind of checkpoint (multimodal `gemma4`, text-only
   `gemma4_text`, or drafter `gemma4_assistant`) and the typed spec; unsupported variants
   (MoE, no PLE, no KV sharing) fail here with a message, before any weight is read.
2. `SafetensorsCheckpoint`: the safetensors files (one file, or shards with
   `model.safetensors.index.json`); pickled weights are never opened.
3. `map_target_keys` / `map_drafter_keys`: checkpoint key -> parameter name of the
   transformers module (`Gemma4ForCausalLM` / `Gemma4AssistantForCausalLM`). Every key is
   either mapped or skipped for a stated reason (vision/audio towers, K/V projections of
   KV-shared layers, the tied LM head); every parameter must be found with its exact shape.
4. `load_target` / `load_drafter` build the module on the meta device and assign the tensors,
   so a real-size checkpoint is read once, tensor by tensor, with no random init.
5. `check_pair`: every property the drafter relies on, compared with the target; all
   mismatches named at once.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from export.config import FULL, SLIDING, DrafterSpec, TargetSpec, UnsupportedModelError
from export.hf_compat import patch_transformers

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be read as the expected model. The message names
    the file, key or field at fault."""


class PairMismatchError(CheckpointError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("drafter does not fit the target:\n  - " + "\n  - ".join(problems))


# ---------------------------------------------------------------------------- config


@dataclass(frozen=True)
class CheckpointInfo:
    path: Path
    model_type: str  # gemma4 | gemma4_text | gemma4_assistant
    hf_config: object  # the transformers config of the module we build
    spec: TargetSpec | DrafterSpec


def read_config(path: str | Path) -> CheckpointInfo:
    patch_transformers()
    from transformers import Gemma4AssistantConfig, Gemma4Config, Gemma4TextConfig

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; pass a local Hugging Face checkpoint directory")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path}: no config.json; is this a Hugging Face checkpoint directory?")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: invalid JSON ({e})") from None
    model_type = raw.get("model_type")
    try:
        if model_type == "gemma4":
            hf = Gemma4Config.from_dict(raw).get_text_config()
            return CheckpointInfo(path, model_type, hf, TargetSpec.from_hf(hf))
        if model_type == "gemma4_text":
            hf = Gemma4TextConfig.from_dict(raw)
            return CheckpointInfo(path, model_type, hf, TargetSpec.from_hf(hf))
        if model_type == "gemma4_assistant":
            hf = Gemma4AssistantConfig.from_dict(raw)
            return CheckpointInfo(path, model_type, hf, DrafterSpec.from_hf(hf))
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{cfg_file}: {e}") from None
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{cfg_file}: not a valid {model_type} config ({e})") from None
    raise UnsupportedModelError(
        f"{cfg_file}: model_type {model_type!r} is not supported; expected 'gemma4' "
        "(Gemma4ForConditionalGeneration), 'gemma4_text' (Gemma4ForCausalLM) or 'gemma4_assistant'"
    )


# ---------------------------------------------------------------------------- safetensors


class SafetensorsCheckpoint:
    """Key -> tensor access over one or more safetensors files, opened lazily."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._handles: dict = {}
        self._headers: dict = {}
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from None
            for shard in sorted(set(weight_map.values())):
                if not (self.path / shard).is_file():
                    raise CheckpointError(f"{index} names shard {shard!r}, which is missing from {self.path}")
            self.files = sorted(set(weight_map.values()))
        else:
            self.files = sorted(p.name for p in self.path.glob("*.safetensors"))
            if not self.files:
                pickled = sorted(p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
                hint = (
                    f" It has {', '.join(pickled)}: pickled weights are never loaded (they can run code); "
                    "convert them to safetensors first."
                    if pickled
                    else ""
                )
                raise CheckpointError(f"{self.path}: no *.safetensors weights.{hint}")
            weight_map = {}
        self.key_file: dict[str, str] = {}
        for name in self.files:
            for key in self._open(name).keys():
                if key in self.key_file:
                    raise CheckpointError(f"{self.path}: tensor {key!r} is stored twice ({self.key_file[key]}, {name})")
                self.key_file[key] = name
        if weight_map and weight_map.keys() != self.key_file.keys():
            diff = sorted(set(weight_map) ^ set(self.key_file))[:5]
            raise CheckpointError(f"{index}: index and shards disagree on keys, e.g. {diff}")

    def _open(self, name: str):
        from safetensors import SafetensorError, safe_open

        if name not in self._handles:
            file = self.path / name
            try:
                self._handles[name] = safe_open(str(file), framework="pt")
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(
                    f"{file}: cannot read as safetensors ({e}); the file may be truncated or corrupt"
                ) from None
        return self._handles[name]

    def keys(self) -> list[str]:
        return sorted(self.key_file)

    def get(self, key: str) -> torch.Tensor:
        return self._read(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key)[3]

    def rows(self, key: str):
        """`read(a, b)`: rows a..b-1 of a tensor in its stored dtype, without reading the rest
        (how large tables are quantized in bounded memory)."""
        return lambda a, b: self._read(key, a, b)

    def _entry(self, key: str):
        """(file, first byte, dtype, shape, bytes) of a tensor, from its file's header."""
        name = self.key_file[key]
        file = self.path / name
        if name not in self._headers:
            self._open(name)  # validated by safetensors first: its errors name the problem
            with open(file, "rb") as f:
                size = struct.unpack("<Q", f.read(8))[0]
                self._headers[name] = (8 + size, json.loads(f.read(size)))
        base, header = self._headers[name]
        e = header[key]
        a, b = e["data_offsets"]
        return file, base + a, e["dtype"], tuple(e["shape"]), b - a

    def _read(self, key: str, a: int | None = None, b: int | None = None) -> torch.Tensor:
        """Plain reads into memory this process owns (not a memory map: pages of a mapped
        15 GB checkpoint would count as resident memory of the export until the kernel
        reclaims them, and hide what the export itself holds)."""
        file, start, dtype, shape, nbytes = self._entry(key)
        if dtype not in _DTYPES:
            raise CheckpointError(f"{file}: tensor {key!r} has dtype {dtype}, which this reader does not know")
        if not shape:
            a, b, row, out_shape = 0, 1, nbytes, ()
        else:
            a, b = (0, shape[0]) if a is None else (a, min(b, shape[0]))
            row = nbytes // shape[0] if shape[0] else 0
            out_shape = (b - a, *shape[1:])
        count = (b - a) * row
        if count <= 0:
            return torch.empty(out_shape, dtype=_DTYPES[dtype])
        buf = bytearray(count)
        with open(file, "rb", buffering=0) as f:
            f.seek(start + a * row)
            got = f.readinto(buf)
        if got != count:
            raise CheckpointError(
                f"{file}: cannot read tensor {key!r} (file ends early); the file may be truncated or corrupt"
            )
        return torch.frombuffer(buf, dtype=_DTYPES[dtype]).reshape(out_shape)


_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


# ---------------------------------------------------------------------------- key mapping

_MULTIMODAL_SKIP = ("model.vision_tower.", "model.audio_tower.", "model.embed_vision.", "model.embed_audio.")
_SHARED_KV_PARAMS = ("k_proj", "v_proj", "k_norm", "v_norm")


def map_target_keys(keys: list[str], model_type: str, spec: TargetSpec) -> tuple[dict[str, str], list[str]]:
    """Checkpoint key -> `Gemma4ForCausalLM` parameter name, and the keys skipped on purpose.
    Keys that are neither are returned as mapped to themselves and rejected by `_assign`."""
    prefix = "model.language_model." if model_type == "gemma4" else "model."
    first_shared = spec.attention.first_shared_layer
    mapping, skipped = {}, []
    for key in keys:
        if model_type == "gemma4" and key.startswith(_MULTIMODAL_SKIP):
            skipped.append(key)  # vision / audio: not part of the text decoder
            continue
        if key == "lm_head.weight":
            skipped.append(key)  # tied to embed_tokens (checked equal in load_target)
            continue
        if key.startswith(prefix):
            name = "model." + key[len(prefix) :]
            parts = name.split(".")
            if (
                len(parts) == 6
                and parts[1] == "layers"
                and int(parts[2]) >= first_shared
                and parts[3] == "self_attn"
                and parts[4] in _SHARED_KV_PARAMS
            ):
                skipped.append(key)  # KV-shared layers reuse their source layer's K/V
                continue
            mapping[key] = name
        else:
            mapping[key] = key
    return mapping, skipped


def map_drafter_keys(keys: list[str]) -> tuple[dict[str, str], list[str]]:
    mapping, skipped = {}, []
    for key in keys:
        if key == "lm_head.weight":
            skipped.append(key)  # tied to model.embed_tokens
        else:
            mapping[key] = key
    return mapping, skipped


# ---------------------------------------------------------------------------- loading


def _expected_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Persistent parameters and buffers, tied duplicates counted once."""
    state = module.state_dict(keep_vars=True)
    seen, out = {}, {}
    for name, t in state.items():
        if id(t) in seen:
            continue
        seen[id(t)] = name
        out[name] = t
    return out


# tensors at least this large are left in the checkpoint by a lazy load (`load_pair(lazy=True)`)
LAZY_MIN_ELEMENTS = 1 << 16


def _assign(
    module, ckpt: SafetensorsCheckpoint, mapping: dict[str, str], dtype: torch.dtype, what: str, quantization=None,
    lazy: bool = False,
):
    expected = _expected_tensors(module)
    by_name = {name: key for key, name in mapping.items()}
    unexpected = sorted(key for key, name in mapping.items() if name not in expected)
    missing = sorted(name for name in expected if name not in by_name)
    problems = []
    if missing:
        problems.append(f"missing tensor(s): {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
    if unexpected:
        problems.append(
            f"unexpected tensor(s): {', '.join(unexpected[:10])}" + (" ..." if len(unexpected) > 10 else "")
        )
    for name, param in expected.items():
        if name in by_name:
            shape = ckpt.shape(by_name[name])
            if shape != tuple(param.shape):
                problems.append(
                    f"tensor {by_name[name]!r} has shape {list(shape)}, expected {list(param.shape)} for {what}"
                )
    if problems:
        raise CheckpointError(f"{ckpt.path}: weights do not match the {what} config:\n  - " + "\n  - ".join(problems))

    if lazy:
        _assign_lazy(module, ckpt, by_name, expected, dtype)
    elif quantization is None:
        state = {name: _read(ckpt, by_name[name], dtype) for name in expected}
        module.load_state_dict(state, strict=False, assign=True)
    else:
        _assign_quantized(module, ckpt, by_name, expected, quantization)


def _read(ckpt: SafetensorsCheckpoint, key: str, dtype: torch.dtype) -> torch.Tensor:
    t = ckpt.get(key)
    return t if not t.is_floating_point() else t.to(dtype)


def _assign_lazy(module, ckpt: SafetensorsCheckpoint, by_name: dict, expected: dict, dtype: torch.dtype) -> None:
    """Floating tensors of at least LAZY_MIN_ELEMENTS become placeholders (one zero expanded
    to the shape: no memory) and stay in the checkpoint; `module.weight_sources` maps each
    placeholder's data pointer to (checkpoint, key), from which a graph writer reads it
    tensor by tensor (export/onnx_weights.py). Tracing needs shapes only."""
    state, sources = {}, {}
    for name, t in expected.items():
        key = by_name[name]
        if t.is_floating_point() and t.numel() >= LAZY_MIN_ELEMENTS:
            state[name] = torch.zeros((), dtype=dtype).expand(tuple(t.shape))
            sources[state[name].data_ptr()] = (ckpt, key)
        else:
            state[name] = _read(ckpt, key, dtype)
    module.load_state_dict(state, strict=False, assign=True)
    module.weight_sources = sources


def _assign_quantized(model, ckpt: SafetensorsCheckpoint, by_name: dict, expected: dict, quantization: dict) -> None:
    """Read the target in bounded memory, quantizing as it reads (the ExecuTorch recipe of
    export/quantize.py): one decoder layer at a time in fp32, quantized before the next is
    read; the token and PLE tables quantized (int8 or int4 rows) chunk by chunk straight from
    the checkpoint file; the tied LM head given its own copy, read again by blocks of rows and
    quantized as a linear. Peak: the quantized model plus one layer (or one block of table or
    head rows) in fp32, instead of the whole model in fp32."""
    from export.quantize import TABLES, LinearRecipe

    recipe = LinearRecipe(quantization["linear"], quantization["group_size"], quantization.get("keep_8bit", ()))
    tables = {}
    table_cls = TABLES.get(quantization.get("embedding"))
    if table_cls is not None:
        tables = {
            name: name.rsplit(".", 1)[0]
            for name in expected
            if isinstance(model.get_submodule(name.rsplit(".", 1)[0]), torch.nn.Embedding)
        }
    t0 = time.time()

    def progress(what: str) -> None:  # minutes at E4B's size: say where the reading is
        print(f"[read] {what} quantized ({time.time() - t0:.0f}s)", flush=True)

    for name, path in tables.items():
        parent, _, attr = path.rpartition(".")
        old = model.get_submodule(path)
        scale = getattr(old, "scalar_embed_scale", None)
        setattr(model.get_submodule(parent), attr, table_cls.from_rows(ckpt.rows(by_name[name]), old.num_embeddings, scale))
        progress(f"table {path}")
    units: dict[str, list[str]] = {}
    for name in expected:
        if name not in tables:
            parts = name.split(".")
            unit = ".".join(parts[:3]) if parts[:2] == ["model", "layers"] else ""
            units.setdefault(unit, []).append(name)
    for unit in sorted(units, key=lambda u: (u == "", int(u.split(".")[2]) if u else 0)):
        root = model.get_submodule(unit) if unit else model
        cut = len(unit) + 1 if unit else 0
        root.load_state_dict(
            {name[cut:]: _read(ckpt, by_name[name], torch.float32) for name in units[unit]}, strict=False, assign=True
        )
        if unit:
            recipe.quantize(root, unit)
            progress(unit)
    head = getattr(model, "lm_head", None)
    if head is not None and head.weight.is_meta:  # tied to the token table: its own copy, read by row blocks
        recipe.quantize_from_rows(head, "lm_head", ckpt.rows(by_name["model.embed_tokens.weight"]))
        progress("lm_head (tied: its own copy)")
    recipe.quantize(model)
    recipe.check()


def _materialize_non_persistent(model) -> None:
    """Buffers that are not stored in checkpoints (RoPE tables, embedding scales) were created
    on the meta device; recompute them on the CPU."""
    from transformers.models.gemma4.modeling_gemma4 import Gemma4TextRotaryEmbedding, Gemma4TextScaledWordEmbedding

    for name, module in list(model.named_modules()):
        if isinstance(module, Gemma4TextRotaryEmbedding):
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name), attr, Gemma4TextRotaryEmbedding(module.config, device="cpu"))
        elif isinstance(module, Gemma4TextScaledWordEmbedding):
            module.embed_scale = torch.tensor(module.scalar_embed_scale)
    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if left:
        raise CheckpointError(f"internal: tensors left uninitialised after loading: {left[:5]}")


def _build(cls, config):
    with torch.device("meta"):
        return cls(config)


def _check_tied_head(ckpt: SafetensorsCheckpoint, embed_key: str, where: Path) -> None:
    """A stored lm_head.weight must equal the token table (compared by row chunks)."""
    if ckpt.shape("lm_head.weight") != ckpt.shape(embed_key):
        raise CheckpointError(f"{where}: lm_head.weight has another shape than embed_tokens; untied heads are not supported")
    head, table = ckpt.rows("lm_head.weight"), ckpt.rows(embed_key)
    rows = ckpt.shape(embed_key)[0]
    for a in range(0, rows, 8192):
        if not torch.equal(head(a, a + 8192), table(a, a + 8192)):
            raise CheckpointError(f"{where}: lm_head.weight differs from embed_tokens; untied heads are not supported")


def load_target(
    path: str | Path, dtype: torch.dtype = torch.float32, quantization: dict | None = None, lazy: bool = False
):
    """A `Gemma4ForCausalLM` (text decoder only) from a gemma4 or gemma4_text directory.
    quantization: the ExecuTorch recipe (export/quantize.py: linear, group_size, embedding,
    keep_8bit) applied while reading, in bounded memory; the LM head is then untied from the
    token table (each quantized in its own scheme) and the module serves export only.
    lazy: the large tensors stay in the checkpoint (see `_assign_lazy`): a module to trace,
    whose weights a graph writer reads one by one; it cannot run."""
    from transformers import Gemma4ForCausalLM

    info = read_config(path)
    if not isinstance(info.spec, TargetSpec):
        raise CheckpointError(f"{info.path}: this is a drafter ({info.model_type}); expected a Gemma 4 target")
    ckpt = SafetensorsCheckpoint(info.path)
    mapping, _ = map_target_keys(ckpt.keys(), info.model_type, info.spec)
    model = _build(Gemma4ForCausalLM, info.hf_config)
    if "lm_head.weight" in ckpt.key_file:
        _check_tied_head(ckpt, next(k for k, n in mapping.items() if n == "model.embed_tokens.weight"), info.path)
    _assign(model, ckpt, mapping, dtype, "target", quantization, lazy)
    if quantization is None:
        model.tie_weights()
    _materialize_non_persistent(model)
    _load_generation_config(model, info.path)
    return model.eval().requires_grad_(False)


def load_drafter(path: str | Path, dtype: torch.dtype = torch.float32, lazy: bool = False):
    from transformers import Gemma4AssistantForCausalLM

    info = read_config(path)
    if not isinstance(info.spec, DrafterSpec):
        raise CheckpointError(f"{info.path}: model_type {info.model_type!r} is a target; expected gemma4_assistant")
    ckpt = SafetensorsCheckpoint(info.path)
    mapping, _ = map_drafter_keys(ckpt.keys())
    model = _build(Gemma4AssistantForCausalLM, info.hf_config)
    _assign(model, ckpt, mapping, dtype, "drafter", lazy=lazy)
    model.tie_weights()
    _materialize_non_persistent(model)
    if model.masked_embedding is not None:
        check_token_ordering(model.masked_embedding.token_ordering, info.spec.vocab_size, info.path)
    _load_generation_config(model, info.path)
    return model.eval().requires_grad_(False)


def _load_generation_config(model, path: Path) -> None:
    from transformers import GenerationConfig

    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path)


def check_token_ordering(ordering: torch.Tensor, vocab_size: int, where: Path | str = "drafter") -> None:
    o = ordering.long()
    if o.shape != (vocab_size,) or not torch.equal(torch.sort(o).values, torch.arange(vocab_size)):
        raise CheckpointError(
            f"{where}: masked_embedding.token_ordering is not a permutation of 0..{vocab_size - 1}; "
            "the centroid head would score the wrong tokens"
        )


# ---------------------------------------------------------------------------- pair check


def check_pair(target: TargetSpec, drafter: DrafterSpec, target_rope: dict | None = None, drafter_rope: dict | None = None):
    """Raise PairMismatchError naming every property of the drafter that does not fit."""
    problems = []
    if drafter.backbone_hidden_size != target.hidden_size:
        problems.append(
            f"drafter backbone_hidden_size {drafter.backbone_hidden_size} != target hidden_size {target.hidden_size}"
        )
    if drafter.vocab_size != target.vocab_size:
        problems.append(f"drafter vocab_size {drafter.vocab_size} != target vocab_size {target.vocab_size}")
    ta, da = target.attention, drafter.attention
    producers = ta.kv_producers()
    for layer_type in sorted(set(da.layer_types)):
        if layer_type not in producers:
            problems.append(f"drafter has {layer_type} layers but the target shares no {layer_type} KV")
            continue
        if da.head_dim_of(layer_type) != ta.head_dim_of(layer_type):
            problems.append(
                f"{layer_type} head_dim: drafter {da.head_dim_of(layer_type)} != target {ta.head_dim_of(layer_type)}"
            )
        if da.kv_heads(layer_type) != ta.kv_heads(layer_type):
            problems.append(
                f"{layer_type} num_key_value_heads: drafter {da.kv_heads(layer_type)} != target {ta.kv_heads(layer_type)}"
            )
    if da.sliding_window != ta.sliding_window:
        problems.append(f"sliding_window: drafter {da.sliding_window} != target {ta.sliding_window}")
    if target_rope is not None and drafter_rope is not None:
        for layer_type in (SLIDING, FULL):
            t, d = target_rope.get(layer_type), drafter_rope.get(layer_type)
            if layer_type in da.layer_types and _rope_key(t) != _rope_key(d):
                problems.append(f"{layer_type} RoPE: drafter {d} != target {t}")
    if drafter.use_ordered_embeddings and drafter.vocab_size % drafter.num_centroids:
        problems.append(f"vocab_size {drafter.vocab_size} not divisible by num_centroids {drafter.num_centroids}")
    if problems:
        raise PairMismatchError(problems)


def _rope_key(params: dict | None):
    if params is None:
        return None
    return (
        params.get("rope_type", "default"),
        float(params.get("rope_theta", 0)),
        float(params.get("partial_rotary_factor", 1.0)),
    )


def parameter_count(path: str | Path) -> int:
    """Parameters of the module a checkpoint directory builds (from its config alone: built on
    the meta device, nothing read), tied tensors once."""
    from transformers import Gemma4AssistantForCausalLM, Gemma4ForCausalLM

    info = read_config(path)
    cls = Gemma4ForCausalLM if isinstance(info.spec, TargetSpec) else Gemma4AssistantForCausalLM
    return sum(t.numel() for t in _expected_tensors(_build(cls, info.hf_config)).values())


def fp32_pair_bytes(target_dir: str | Path, drafter_dir: str | Path) -> int:
    """fp32 bytes of a pair's parameters, from the configs alone (what holding it in fp32 costs)."""
    return 4 * (parameter_count(target_dir) + parameter_count(drafter_dir))


def load_pair(
    target_dir: str | Path,
    drafter_dir: str | Path | None,
    dtype: torch.dtype = torch.float32,
    quantization: dict | None = None,
    lazy: bool = False,
):
    """Target and (optionally) drafter, checked against each other before any weight is read.
    lazy: large tensors left in the checkpoint, for the ONNX writer (see `load_target`).
    quantization: the target is quantized as it is read (see `load_target`); the drafter
    (78.5M parameters at E4B's size) is read in fp32 and quantized with the rest of the
    program."""
    t_info = read_config(target_dir)
    if not isinstance(t_info.spec, TargetSpec):
        raise CheckpointError(f"{target_dir}: expected a Gemma 4 target, found {t_info.model_type}")
    if drafter_dir is not None:
        d_info = read_config(drafter_dir)
        if not isinstance(d_info.spec, DrafterSpec):
            raise CheckpointError(f"{drafter_dir}: expected a gemma4_assistant drafter, found {d_info.model_type}")
        check_pair(
            t_info.spec,
            d_info.spec,
            t_info.hf_config.rope_parameters,
            d_info.hf_config.get_text_config().rope_parameters,
        )
    target = load_target(target_dir, dtype, quantization, lazy)
    drafter = load_drafter(drafter_dir, dtype, lazy) if drafter_dir is not None else None
    return target, drafter
