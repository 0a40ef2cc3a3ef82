"""Acceptance of the recorder: for every family transformers provides, a tiny random model built
from a config is recorded; what was recorded equals what the model's router computes; the
matching moebench router, replayed on the recorded logits, picks the model's experts exactly."""

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from moebench.cli import main  # noqa: E402
from moebench.kinds.traces.families import (  # noqa: E402
    FAMILIES, equivalent_choices, replay_layer, router_modules, same_choices, selection_scores,
)
from moebench.kinds.traces.format import read_trace, write_trace  # noqa: E402
from moebench.kinds.traces.recorder import record_model  # noqa: E402
from moebench.kinds.traces.tiny import TINY, tiny_model  # noqa: E402
from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402

FAMILIES_HERE = [f for f in TINY if f in CONFIG_MAPPING]
N = 96


def ids(n=N, seed=1):
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed))


def router_inputs(model):
    """Forward pre-hooks keeping each router module's input hidden states <[T, d]>."""
    seen, handles = {}, []
    for number, name, module in router_modules(model):
        def pre(mod, args, name=name):
            seen.setdefault(name, []).append(args[0].detach().reshape(-1, args[0].shape[-1]).clone())
        handles.append(module.register_forward_pre_hook(pre))
    return seen, handles


@pytest.mark.parametrize("family", FAMILIES_HERE)
def test_recorded_equals_router_and_replay_reproduces_it(family, tmp_path):
    model = tiny_model(family)
    seen, handles = router_inputs(model)
    header, layers, token_ids = record_model(model, ids(), context=40, progress=False, model_name=family)
    for h in handles:
        h.remove()
    routers = router_modules(model)
    assert header["family"] == family and header["layers"] == [n for n, _, _ in routers]
    assert header["replay"] == FAMILIES[family].replay(model.config)
    assert len(layers) == len(routers) >= 2 and torch.equal(token_ids, ids())
    for (number, name, module), layer in zip(routers, layers):
        hidden = torch.cat(seen[name])  # [N, d]: what the router saw, window by window
        assert hidden.shape[0] == N
        with torch.no_grad():
            logits, weights, experts = module(hidden)
            # the recorded logits are the gate's own linear map (GPT-OSS's gate has a bias)
            independent = F.linear(hidden.float(), module.weight.float(), getattr(module, "bias", None))
        assert torch.equal(layer.logits, logits) and torch.equal(layer.experts, experts)
        assert torch.equal(layer.weights, weights.float())
        torch.testing.assert_close(layer.logits.float(), independent, rtol=1e-5, atol=1e-5)
        replayed = replay_layer(header, layer.logits, layer.bias)
        assert bool(same_choices(replayed, layer.experts).all()), f"{family} layer {number}"
        if FAMILIES[family].sorted_choices:
            assert torch.equal(replayed, layer.experts)  # same order too
        if FAMILIES[family].bias_attr:
            assert torch.equal(layer.bias, getattr(module, FAMILIES[family].bias_attr))
            # the bias matters: without it the same router picks other experts for some tokens
            assert not bool(same_choices(replay_layer(header, layer.logits, None), layer.experts).all())
    # and the trace written to disk reads back as recorded
    t = read_trace(write_trace(tmp_path / family, header, layers, token_ids))
    for j, layer in enumerate(layers):
        assert torch.equal(t.layer(j).experts, layer.experts) and torch.equal(t.layer(j).logits, layer.logits)


def test_bfloat16_model_records_bfloat16_logits_and_replays_up_to_ties(tmp_path):
    model = tiny_model("mixtral").to(torch.bfloat16)
    header, layers, token_ids = record_model(model, ids(400), context=200, progress=False)
    assert layers[0].logits.dtype == torch.bfloat16
    t = read_trace(write_trace(tmp_path / "bf16", header, layers, token_ids))
    assert t.header["dtype"] == "bfloat16"
    for j, layer in enumerate(layers):
        logits = t.layer(j).logits  # fp32, exactly the bf16 values
        assert torch.equal(logits, layer.logits.float())
        replayed = replay_layer(t.header, logits)
        differ = ~same_choices(replayed, layer.experts)
        # any difference is a tie in the selection score (bf16 keeps 8 bits) broken differently
        assert bool(equivalent_choices(selection_scores(t.header, logits), replayed, layer.experts).all())
        assert int(differ.sum()) < 0.05 * 400


def test_record_command_from_a_saved_model(tmp_path, capsys):
    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text("Mixture of experts route tokens to experts. " * 8, encoding="utf-8")
    out = tmp_path / "trace"
    argv = ["trace", "record", str(tmp_path / "model"), "--text", str(text), "--out", str(out),
            "--tokenizer", "bytes", "--max-tokens", "150", "--context", "64", "--quiet"]
    assert main(argv) == 0
    assert "qwen3_moe, 150 tokens, 2 MoE layers, E=8, k=2" in capsys.readouterr().out
    t = read_trace(out)
    assert t.header["tokenizer"] == "bytes" and t.header["text_sha256"]
    assert t.token_ids.tolist() == list(text.read_bytes()[:150])
    assert main(["trace", "stats", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "zipf_s" in printed and "| 0 | 150 |" in printed
    # bad input: one line, exit 2, nothing written
    assert main(["trace", "record", str(tmp_path / "nope"), "--text", str(text), "--out",
                 str(tmp_path / "x"), "--tokenizer", "bytes", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"moebench: error: {tmp_path / 'nope'}: cannot load the model") and "\n" not in err
    assert not (tmp_path / "x").exists()
    # a model folder without tokenizer files and no --tokenizer: refused, not recorded empty
    assert main(["trace", "record", str(tmp_path / "model"), "--text", str(text), "--out", str(tmp_path / "y"),
                 "--quiet"]) == 2
    assert "the tokenizer has" in capsys.readouterr().err and not (tmp_path / "y").exists()


def test_record_command_with_the_models_own_tokenizer(tmp_path, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]"] + "mixture of experts route each token to a few the router picks which".split()
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tiny_model("olmoe").save_pretrained(tmp_path / "model")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(tmp_path / "model")
    text = tmp_path / "text.txt"
    text.write_text("the router picks which experts each token goes to " * 5, encoding="utf-8")
    assert main(["trace", "record", str(tmp_path / "model"), "--text", str(text), "--out", str(tmp_path / "t"),
                 "--quiet"]) == 0
    t = read_trace(tmp_path / "t")
    expected = [words.index(w) if w in words else 0 for w in text.read_text().split()]
    assert t.token_ids.tolist() == expected and t.header["tokenizer"] == str(tmp_path / "model")


def test_import_moebench_does_not_import_transformers():
    code = ("import sys, moebench, moebench.cli, moebench.run.runner, moebench.report.build; "
            "from moebench.core.workloads import WORKLOADS; from moebench.routers.registry import ROUTERS; "
            "WORKLOADS.classes(); ROUTERS.classes(); moebench.cli.build_parser(); "
            "print('transformers' in sys.modules, 'safetensors' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def test_a_model_without_routers_is_refused_in_one_line():
    from transformers import AutoConfig, AutoModelForCausalLM

    from moebench.core.errors import MoebenchError

    dense = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "llama", vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(MoebenchError, match=r"^dense: no router modules \(\*TopKRouter\) found in a llama model"):
        record_model(dense, ids(8) % 64, progress=False, model_name="dense")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_recording_on_cuda_matches_the_replay():
    model = tiny_model("deepseek_v3").to("cuda")
    header, layers, _ = record_model(model, ids(), context=48, progress=False)
    assert header["device"].startswith("cuda")
    for layer in layers:
        assert layer.logits.device.type == "cpu"
        assert bool(same_choices(replay_layer(header, layer.logits, layer.bias), layer.experts).all())
