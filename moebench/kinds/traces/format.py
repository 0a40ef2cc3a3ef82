"""The moebench trace format (docs/traces.md): a folder with ``trace.json`` and ``trace.safetensors``.

trace.json, the header (a JSON object)::

    format: "moebench-trace"   format_version: 1
    model, family, source ("transformers" | "megatron" | "synthetic")
    layers: [model layer number of each recorded MoE layer, in order]     (L entries)
    num_experts: E   top_k: k   tokens: N
    score_function: "softmax" | "sigmoid"    routing: the family's routing options
    replay: {"name": router, "params": {...}} or null (the moebench router that reproduces it)
    logits / weights / token_ids / bias: which tensors are present (bool)
    dtype: storage dtype of the logits ("float32" | "bfloat16" | "float16")
    tokenizer, vocab_size, text_sha256, moebench_version, transformers_version, created

trace.safetensors, the tensors (j = 0..L-1 is the position in ``layers``)::

    token_ids          <int64>[N]          (when token_ids)
    layers.j.experts   <int32>[N, k]       the experts the model chose, in its order
    layers.j.logits    <dtype>[N, E]       raw router logits before top-k (when logits)
    layers.j.weights   <float32>[N, k]     the model's combine weights (when weights)
    layers.j.bias      <float32>[E]        selection-only correction bias (when bias)

A trace without logits is *index-only*: it is replayed as fixed routing (see
`index_only_logits`). Every problem with a file raises a one-line `TraceError` naming the
file and what is wrong; nothing is written half: `write_trace` renames complete files into place.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moebench.core.errors import MoebenchError

FORMAT = "moebench-trace"
FORMAT_VERSION = 1
HEADER = "trace.json"
TENSORS = "trace.safetensors"
LOGIT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_ST_DTYPE = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
SCORE_FUNCTIONS = ("softmax", "sigmoid")
PRESENCE = ("logits", "weights", "token_ids", "bias")


class TraceError(MoebenchError):
    """A trace file is missing, malformed or truncated: ``FILE: what is wrong``."""

    def __init__(self, file: str | Path, message: str):
        self.file = str(file)
        super().__init__(f"{file}: {message}")


def _safetensors():
    try:
        import safetensors.torch  # noqa: F401
        from safetensors import safe_open
    except ImportError:
        raise MoebenchError("traces need the safetensors package: pip install 'moebench[traces]'") from None
    return safe_open, safetensors.torch


@dataclass(frozen=True)
class LayerTrace:
    """One recorded MoE layer.

    experts <int64>[N, k]; logits <float32>[N, E] or None (index-only; converted from the
    stored dtype, which is exact); weights <float32>[N, k] or None; bias <float32>[E] or None.
    """

    experts: torch.Tensor
    logits: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    bias: torch.Tensor | None = None


def _require(header: dict, file, key: str, kind, what: str):
    if key not in header:
        raise TraceError(file, f"header field {key!r} is missing; expected {what}")
    value = header[key]
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if not ok:
        raise TraceError(file, f"header field {key!r}: expected {what}, got {value!r}")
    return value


def check_header(header, file) -> dict:
    """The header if it is well formed, else a TraceError naming the field."""
    if not isinstance(header, dict):
        raise TraceError(file, f"expected a JSON object, got {type(header).__name__}")
    if header.get("format") != FORMAT:
        raise TraceError(file, f"header field 'format': expected {FORMAT!r}, got {header.get('format')!r}")
    version = _require(header, file, "format_version", int, "an integer")
    if version > FORMAT_VERSION:
        raise TraceError(file, f"format_version {version} is newer than this moebench reads ({FORMAT_VERSION})")
    layers = _require(header, file, "layers", list, "a non-empty list of layer numbers")
    if not layers or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers):
        raise TraceError(file, f"header field 'layers': expected a non-empty list of integers, got {layers!r}")
    for key in ("num_experts", "top_k", "tokens"):
        if _require(header, file, key, int, "a positive integer") < 1:
            raise TraceError(file, f"header field {key!r}: expected a positive integer, got {header[key]!r}")
    if header["top_k"] > header["num_experts"]:
        raise TraceError(file, f"top_k={header['top_k']} exceeds num_experts={header['num_experts']}")
    score = header.get("score_function", "softmax")
    if score not in SCORE_FUNCTIONS:
        raise TraceError(file, f"header field 'score_function': expected one of {SCORE_FUNCTIONS}, got {score!r}")
    for key in PRESENCE:
        if not isinstance(header.get(key, False), bool):
            raise TraceError(file, f"header field {key!r}: expected a boolean, got {header[key]!r}")
    if header.get("logits") and header.get("dtype") not in LOGIT_DTYPES:
        raise TraceError(file, f"header field 'dtype': expected one of {tuple(LOGIT_DTYPES)}, got {header.get('dtype')!r}")
    replay = header.get("replay")
    if replay is not None and not (isinstance(replay, dict) and isinstance(replay.get("name"), str)
                                   and isinstance(replay.get("params", {}), dict)):
        raise TraceError(file, f"header field 'replay': expected null or {{name, params}}, got {replay!r}")
    return header


def expected_tensors(header: dict) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (safetensors dtype, shape) of every tensor the header promises."""
    n, e, k = header["tokens"], header["num_experts"], header["top_k"]
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    if header.get("token_ids"):
        out["token_ids"] = ("I64", (n,))
    for j in range(len(header["layers"])):
        out[f"layers.{j}.experts"] = ("I32", (n, k))
        if header.get("logits"):
            out[f"layers.{j}.logits"] = (_ST_DTYPE[header["dtype"]], (n, e))
        if header.get("weights"):
            out[f"layers.{j}.weights"] = ("F32", (n, k))
        if header.get("bias"):
            out[f"layers.{j}.bias"] = ("F32", (e,))
    return out


@dataclass
class Trace:
    """An opened trace: the header, the token ids <int64>[N] (or None), and its layers, each
    read from disk on first use (`layer`) and checked then (expert range, finite logits)."""

    path: Path
    header: dict
    token_ids: torch.Tensor | None = None
    _layers: dict = field(default_factory=dict, repr=False)
    _loader: object = field(default=None, repr=False)

    @property
    def num_layers(self) -> int:
        return len(self.header["layers"])

    @property
    def tokens(self) -> int:
        return self.header["tokens"]

    @property
    def num_experts(self) -> int:
        return self.header["num_experts"]

    @property
    def top_k(self) -> int:
        return self.header["top_k"]

    @property
    def has_logits(self) -> bool:
        return bool(self.header.get("logits"))

    def layer(self, j: int) -> LayerTrace:
        """Layer at position ``j`` (0..L-1) of ``header['layers']``."""
        if not 0 <= j < self.num_layers:
            raise TraceError(self.path, f"layer position {j} is out of range; the trace has {self.num_layers} layers")
        if j not in self._layers:
            self._layers[j] = self._loader(j) if self._loader else None
            if self._layers[j] is None:
                raise TraceError(self.path, f"layer {j} has no data")
        return self._layers[j]

    def vocab_freq(self) -> torch.Tensor | None:
        """<float32>[V]: each token id's share of the trace (V = vocab_size or the largest id + 1)."""
        if self.token_ids is None:
            return None
        v = max(int(self.header.get("vocab_size") or 0), int(self.token_ids.max()) + 1 if self.tokens else 1)
        counts = torch.bincount(self.token_ids, minlength=v).float()
        return counts / counts.sum().clamp_min(1)


def check_layer(layer: LayerTrace, header: dict, file, where: str) -> LayerTrace:
    """The layer if its values are valid (experts in [0, E), distinct per token; logits finite)."""
    e = header["num_experts"]
    ex = layer.experts
    if ex.numel() and (int(ex.min()) < 0 or int(ex.max()) >= e):
        raise TraceError(file, f"{where}: expert index {int(ex.max()) if int(ex.max()) >= e else int(ex.min())} "
                               f"outside [0, {e})")
    if ex.shape[1] > 1 and ex.numel():
        s = ex.sort(dim=1).values
        if bool((s[:, 1:] == s[:, :-1]).any()):
            raise TraceError(file, f"{where}: a token lists the same expert twice")
    if layer.logits is not None and not bool(torch.isfinite(layer.logits).all()):
        raise TraceError(file, f"{where}: logits contain NaN or infinite values")
    return layer


def read_trace(path: str | Path) -> Trace:
    """Open a moebench trace folder (or its trace.json); `readers.open_trace` also opens Megatron folders."""
    path = Path(path)
    folder = path.parent if path.name == HEADER else path
    header_file, tensor_file = folder / HEADER, folder / TENSORS
    if not folder.is_dir():
        raise TraceError(folder, "no such trace folder")
    if not header_file.is_file():
        raise TraceError(header_file, "missing (a moebench trace folder holds trace.json and trace.safetensors)")
    try:
        header = json.loads(header_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:  # RecursionError: [[[[... (#23)
        raise TraceError(header_file, f"not valid JSON ({exc})") from None
    check_header(header, header_file)
    if not tensor_file.is_file():
        raise TraceError(tensor_file, "missing")
    safe_open, _ = _safetensors()
    expected = expected_tensors(header)
    try:
        with safe_open(str(tensor_file), "pt") as f:
            present = set(f.keys())
            for name, (dtype, shape) in expected.items():
                if name not in present:
                    raise TraceError(tensor_file, f"tensor {name!r} is missing (the header promises it)")
                sl = f.get_slice(name)
                if sl.get_dtype() != dtype or tuple(sl.get_shape()) != shape:
                    raise TraceError(tensor_file, f"tensor {name!r}: expected {dtype}{list(shape)}, "
                                                  f"got {sl.get_dtype()}{list(sl.get_shape())}")
            token_ids = f.get_tensor("token_ids").long() if "token_ids" in expected else None
    except TraceError:
        raise
    except Exception as exc:  # safetensors' own errors: truncated, bad header, ...
        raise TraceError(tensor_file, f"unreadable safetensors file ({str(exc).splitlines()[0]})") from None
    if token_ids is not None and token_ids.numel() and int(token_ids.min()) < 0:
        raise TraceError(tensor_file, "tensor 'token_ids' has negative ids")

    def load(j: int) -> LayerTrace:
        try:
            with safe_open(str(tensor_file), "pt") as f:
                def get(kind):
                    name = f"layers.{j}.{kind}"
                    return f.get_tensor(name) if name in expected else None
                logits = get("logits")
                layer = LayerTrace(
                    experts=get("experts").long(),
                    logits=None if logits is None else logits.float(),
                    weights=get("weights"),
                    bias=get("bias"),
                )
        except Exception as exc:
            raise TraceError(tensor_file, f"layer {j}: unreadable ({str(exc).splitlines()[0]})") from None
        return check_layer(layer, header, tensor_file, f"layers.{j}")

    return Trace(folder, header, token_ids, _loader=load)


def new_header(**fields) -> dict:
    """A header with the format fields and moebench's version filled in, then ``fields``."""
    from moebench import __version__

    return {"format": FORMAT, "format_version": FORMAT_VERSION, "moebench_version": __version__, **fields}


def write_trace(out: str | Path, header: dict, layers: list[LayerTrace],
                token_ids: torch.Tensor | None = None) -> Path:
    """Write a trace folder; the presence flags, tokens, E and k in ``header`` are set from the
    data. Files are written under temporary names and renamed, so a crash leaves no half trace."""
    if not layers:
        raise MoebenchError(f"{out}: a trace needs at least one layer")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    first = layers[0]
    n, k = first.experts.shape
    header = dict(header)
    header.update(tokens=int(n), top_k=int(k), token_ids=token_ids is not None,
                  logits=first.logits is not None, weights=first.weights is not None, bias=first.bias is not None)
    if first.logits is not None:
        header["num_experts"] = int(first.logits.shape[1])
        header["dtype"] = _dtype_name(first.logits.dtype)  # stored as given: never a lossy cast
    check_header(header, out / HEADER)
    dtype = LOGIT_DTYPES.get(header.get("dtype", "float32"))
    tensors: dict[str, torch.Tensor] = {}
    if token_ids is not None:
        tensors["token_ids"] = token_ids.detach().to("cpu", torch.int64).contiguous()
    for j, layer in enumerate(layers):
        tensors[f"layers.{j}.experts"] = layer.experts.detach().to("cpu", torch.int32).contiguous()
        for kind, value, dt in (("logits", layer.logits, dtype), ("weights", layer.weights, torch.float32),
                                ("bias", layer.bias, torch.float32)):
            if (value is None) != (getattr(first, kind) is None):
                raise MoebenchError(f"{out}: layer {j} {'lacks' if value is None else 'has'} {kind}, layer 0 does not")
            if value is not None:
                tensors[f"layers.{j}.{kind}"] = value.detach().to("cpu", dt).contiguous()
    for name, (st_dtype, shape) in expected_tensors(header).items():
        t = tensors.get(name)
        if t is None or tuple(t.shape) != shape:
            raise MoebenchError(f"{out}: tensor {name} has shape {None if t is None else list(t.shape)}, expected {list(shape)}")
    for j, layer in enumerate(layers):
        check_layer(LayerTrace(layer.experts.long(), None if layer.logits is None else layer.logits.float()),
                    header, out, f"layers.{j}")
    _, st = _safetensors()
    tmp_tensors, tmp_header = out / (TENSORS + ".tmp"), out / (HEADER + ".tmp")
    st.save_file(tensors, str(tmp_tensors))
    tmp_header.write_text(json.dumps(header, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp_tensors, out / TENSORS)
    os.replace(tmp_header, out / HEADER)
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    for name, dt in LOGIT_DTYPES.items():
        if dt == dtype:
            return name
    return "float32"  # float64 and others are stored as float32


def index_only_logits(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """<float32>[N, E] logits that make any top-k router choose the recorded experts, in order:
    0 for experts not chosen, 10 - j for a token's j-th choice (fixed routing for index-only
    traces; the weights such logits imply carry no information)."""
    n, k = experts.shape
    logits = torch.zeros(n, num_experts, dtype=torch.float32, device=experts.device)
    rank_value = 10.0 - torch.arange(k, dtype=torch.float32, device=experts.device)
    logits.scatter_(1, experts, rank_value.expand(n, k))
    return logits
