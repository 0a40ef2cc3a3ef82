"""Record a transformers MoE model's routing with forward hooks on its router modules.

`record_model` runs token ids <int64>[N] through a loaded model in windows of ``context``
tokens (each window an independent sequence, no KV cache carried) and keeps, per MoE layer,
what the router module returned: the raw logits before top-k <[N, E]> in the model's dtype,
the model's own weights <float32>[N, k] and chosen experts <int64>[N, k], plus the selection
bias where the family has one. `record` is the command: load MODEL (a local folder, or a hub
id the user can reach), tokenize the text, record, write the trace. transformers is imported
here only, inside the functions that need it.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

from moebench.core.errors import MoebenchError
from moebench.kinds.traces.families import FAMILIES, family_of, router_modules
from moebench.kinds.traces.format import LayerTrace, new_header, write_trace


class _Hook:
    """Collects one router module's outputs over the windows of a recording."""

    def __init__(self, name: str):
        self.name = name
        self.logits: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []
        self.experts: list[torch.Tensor] = []

    def __call__(self, module, inputs, outputs):
        if not (isinstance(outputs, tuple) and len(outputs) == 3):
            raise MoebenchError(f"router module {self.name} ({type(module).__name__}) returned "
                                f"{type(outputs).__name__}; expected (logits, weights, experts)")
        logits, weights, experts = outputs
        if logits.dim() != 2 or experts.dim() != 2 or experts.shape[0] != logits.shape[0]:
            raise MoebenchError(f"router module {self.name}: unexpected shapes logits {list(logits.shape)}, "
                                f"experts {list(experts.shape)}")
        self.logits.append(logits.detach().to("cpu"))
        self.weights.append(weights.detach().to("cpu", torch.float32))
        self.experts.append(experts.detach().to("cpu", torch.int64))


def record_model(model, token_ids: torch.Tensor, *, context: int = 2048, progress: bool = True,
                 model_name: str = "", tokenizer: str | None = None, text_sha256: str | None = None):
    """(header, [LayerTrace], token_ids) of ``model`` (a transformers MoE model) on token_ids <int64>[N]."""
    config = model.config
    family = family_of(config)
    routers = router_modules(model)
    if not routers:
        import transformers

        raise MoebenchError(f"{model_name or type(model).__name__}: no router modules (*TopKRouter) found in a "
                            f"{getattr(config, 'model_type', '?')} model (transformers {transformers.__version__}; "
                            f"5 or later keeps them); supported families: {', '.join(FAMILIES)}")
    limit = getattr(config, "max_position_embeddings", None) or context
    context = max(1, min(context, limit))
    device = next(model.parameters()).device
    hooks = [_Hook(name) for _, name, _ in routers]
    handles = [module.register_forward_hook(hook) for (_, _, module), hook in zip(routers, hooks)]
    ids = token_ids.to(torch.int64).reshape(-1)
    from tqdm import tqdm

    bar = tqdm(total=ids.numel(), unit="tok", desc="record", file=sys.stderr, disable=not progress)
    try:
        with torch.no_grad():
            for start in range(0, ids.numel(), context):
                window = ids[start:start + context]
                model(input_ids=window[None, :].to(device), use_cache=False)
                bar.update(window.numel())
    finally:
        bar.close()
        for handle in handles:
            handle.remove()
    layers = []
    for (number, name, module), hook in zip(routers, hooks):
        if not hook.logits:
            raise MoebenchError(f"router module {name} never ran: a fused kernel may replace its MoE block "
                                "(try --device cpu, or uninstall the `kernels` package)")
        logits = torch.cat(hook.logits)
        if logits.shape[0] != ids.numel():
            raise MoebenchError(f"router module {name} saw {logits.shape[0]} tokens, expected {ids.numel()}")
        bias = getattr(module, family.bias_attr, None) if family and family.bias_attr else None
        layers.append(LayerTrace(torch.cat(hook.experts), logits, torch.cat(hook.weights),
                                 None if bias is None else bias.detach().to("cpu", torch.float32)))
    e, k = layers[0].logits.shape[1], layers[0].experts.shape[1]
    import transformers

    header = new_header(
        model=model_name or getattr(config, "_name_or_path", "") or type(model).__name__,
        family=getattr(config, "model_type", "unknown"), source="transformers",
        layers=[number for number, _, _ in routers], num_experts=e, top_k=k, tokens=int(ids.numel()),
        score_function=family.score_function if family else "softmax",
        routing=family.routing(config) if family else {},
        replay=family.replay(config) if family else None,
        sorted_choices=family.sorted_choices if family else True,
        tokenizer=tokenizer, vocab_size=getattr(config, "vocab_size", None), text_sha256=text_sha256,
        context=context, transformers_version=transformers.__version__, device=str(device),
        model_dtype=str(layers[0].logits.dtype).removeprefix("torch."),
    )
    return header, layers, ids


def tokenize(text: str, tokenizer: str, model: str) -> tuple[torch.Tensor, str]:
    """(<int64>[N] token ids, tokenizer name): ``bytes`` (UTF-8 bytes as ids, for tiny test
    models) or ``model`` (the model folder's own tokenizer through AutoTokenizer)."""
    if tokenizer == "bytes":
        return torch.tensor(list(text.encode("utf-8")), dtype=torch.int64), "bytes"
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model if tokenizer == "model" else tokenizer)
    except Exception as exc:
        raise MoebenchError(f"{model}: cannot load its tokenizer ({str(exc).splitlines()[0]}); "
                            "pass --tokenizer bytes or a tokenizer folder") from None
    ids = tok(text)["input_ids"]
    if len(tok) <= 2 or (text.strip() and not ids):  # transformers 5 builds an empty tokenizer for a
        # folder without tokenizer files: refuse it rather than record nothing
        raise MoebenchError(f"{model if tokenizer == 'model' else tokenizer}: the tokenizer has {len(tok)} tokens "
                            "and made none of the text (no tokenizer files?); pass --tokenizer bytes or a tokenizer folder")
    return torch.tensor(ids, dtype=torch.int64), getattr(tok, "name_or_path", model)


def load_model(model: str, device: str, dtype: str):
    """A transformers causal-LM from a local folder or a hub id, in eval mode on ``device``."""
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise MoebenchError("recording needs transformers: pip install 'moebench[traces]'") from None
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MoebenchError("--device cuda: CUDA is not available on this machine")
    torch_dtype = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    try:
        loaded = AutoModelForCausalLM.from_pretrained(model, dtype=torch_dtype)
    except Exception as exc:
        raise MoebenchError(f"{model}: cannot load the model ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    return loaded.to(device).eval()


def record(model: str, text_file: str | Path, out: str | Path, *, max_tokens: int | None = None,
           device: str = "cpu", dtype: str = "auto", tokenizer: str = "model", context: int = 2048,
           progress: bool = True) -> Path:
    """The `moebench trace record` command: returns the trace folder written."""
    text_path = Path(text_file)
    try:
        text = text_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MoebenchError(f"{text_path}: no such text file") from None
    except UnicodeDecodeError:
        raise MoebenchError(f"{text_path}: not UTF-8 text") from None
    ids, tokenizer_name = tokenize(text, tokenizer, model)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if ids.numel() == 0:
        raise MoebenchError(f"{text_path}: the text has no tokens")
    loaded = load_model(model, device, dtype)
    vocab = getattr(loaded.config, "vocab_size", None)
    if vocab is not None and int(ids.max()) >= vocab:
        raise MoebenchError(f"{text_path}: token id {int(ids.max())} is outside the model's vocabulary of {vocab}")
    header, layers, ids = record_model(
        loaded, ids, context=context, progress=progress, model_name=str(model), tokenizer=tokenizer_name,
        text_sha256=hashlib.sha256(text.encode("utf-8")).hexdigest(),
    )
    return write_trace(out, header, layers, ids)
