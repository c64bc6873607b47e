"""LoRA adapters (bitengine.lora) against real PEFT on a small random Llama (CPU, fast).

References: PEFT's own model (merged or not) for 16-bit bases; for ternary bases, the same
checkpoint without adapters plus an exact LoRA added by forward hooks, both in float64 so the
int8 activation rounding sees the same inputs.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import bitengine  # noqa: E402
from bitengine.formats.checkpoint import CheckpointReader  # noqa: E402
from bitengine.lora import (  # noqa: E402
    AdapterError,
    apply_adapters,
    merge_hook,
    parse_adapter_arg,
    remove_adapters,
    set_adapters,
)
from bitengine.lora.apply import _probe_ids  # noqa: E402
from bitengine.quant import absmean_quantize, pack_ternary  # noqa: E402

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _hf_llama(seed=0, hidden=64, layers=2):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=hidden, intermediate_size=160, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=False, bos_token_id=0, eos_token_id=1)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # fp16-representable, so the fp16 checkpoint holds the same weights
            p.copy_(p.half().float())
    return model


def _peft_adapter(base, folder, seed=1, bin_file=False, **kw):
    """A PEFT LoRA with random non-zero A and B, saved to `folder`; returns the PeftModel (fp32)."""
    torch.manual_seed(seed)
    kw.setdefault("target_modules", LINEARS)
    cfg = peft.LoraConfig(r=kw.pop("r", 4), lora_alpha=kw.pop("lora_alpha", 8), init_lora_weights=False, **kw)
    model = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    with torch.no_grad():  # PEFT's random B is large; keep the delta LoRA-sized (a few % of W)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.mul_(0.1)
    model.save_pretrained(str(folder), safe_serialization=not bin_file)
    return model


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls: one thread is faster, and immune to a busy machine's oversubscription."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    base = _hf_llama()
    base.save_pretrained(str(root / "hf"))
    bitengine.convert(root / "hf", root / "fp16", weights="fp16", progress=False)
    bitengine.convert(root / "hf", root / "tern", progress=False)
    bitengine.convert(root / "hf", root / "tern_g", scale="group:32", progress=False)
    w = {"root": root, "base": base, "peft": {}}
    w["peft"]["a"] = _peft_adapter(base, root / "a", seed=1)
    w["peft"]["b"] = _peft_adapter(base, root / "b", seed=2, r=2, lora_alpha=3, target_modules=["q_proj", "down_proj"])
    w["ids"] = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    return w


def _logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).double()


def _rel(a, b):
    return float((a - b).norm() / b.norm())


def _peft_merged(pm):
    return copy.deepcopy(pm).merge_and_unload()


# ---- 16-bit base: fused adapter vs PEFT ------------------------------------------------------

@pytest.mark.parametrize("kw", [
    {},
    {"use_rslora": True, "r": 8, "lora_alpha": 4},
    {"r": 4, "rank_pattern": {"q_proj": 2, "mlp.down_proj": 6}, "alpha_pattern": {"v_proj": 32}},
    {"target_modules": r".*\.layers\.1\.(self_attn|mlp)\.(q|up)_proj"},
    {"target_modules": ["k_proj", "gate_proj"], "layers_to_transform": [1], "layers_pattern": "layers"},
    {"fan_in_fan_out": True, "in_file": {"fan_in_fan_out": True}},  # PEFT resets it for nn.Linear targets
    {"target_modules": "all-linear", "exclude_modules": ["o_proj"], "in_file": {"target_modules": "all-linear"}},
    {"target_modules": ["o_proj", "lm_head"], "bin_file": True},
], ids=["plain", "rslora", "rank_alpha_pattern", "regex", "layers_to_transform", "fan_in_fan_out", "all_linear_exclude",
     "head_bin"])
def test_fused_fp16_matches_peft(world, tmp_path, kw):
    kw = dict(kw)
    in_file = kw.pop("in_file", {})
    pm = _peft_adapter(world["base"], tmp_path / "ad", seed=3, **kw)
    _edit_config(tmp_path / "ad", **in_file)  # what PEFT normalizes away on save, as a hand-written config has it
    model = bitengine.load(world["root"] / "fp16", dtype=torch.float32, adapters=[tmp_path / "ad"])
    ref = _logits(_peft_merged(pm), world["ids"])
    got = _logits(model, world["ids"])
    assert _rel(got, ref) < 1e-3
    base = _logits(world["base"], world["ids"])
    assert _rel(ref, base) > 1e-2  # the adapter matters
    assert _rel(got, _logits(pm, world["ids"])) < 1e-3  # and PEFT unmerged agrees


def test_adapter_name_in_keys_and_qlora_config(world, tmp_path):
    """'.lora_A.default.weight' keys and a 4-bit base name in the config (QLoRA) load like any LoRA."""
    from safetensors.torch import load_file, save_file

    src, dst = world["root"] / "a", tmp_path / "q"
    shutil.copytree(src, dst)
    state = load_file(str(dst / "adapter_model.safetensors"))
    save_file({k.replace(".weight", ".default.weight"): v for k, v in state.items()}, str(dst / "adapter_model.safetensors"))
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "unsloth/llama-3-8b-bnb-4bit"
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
    model = bitengine.load(world["root"] / "fp16", dtype=torch.float32, adapters=[str(dst)])
    assert model.lora_state.report["adapters"][0]["qlora_base"]
    assert _rel(_logits(model, world["ids"]), _logits(_peft_merged(world["peft"]["a"]), world["ids"])) < 1e-3


def test_stacked_weighted_sum(world):
    """Two adapters with weights 0.7 and -0.3 = W + 0.7 dW_a - 0.3 dW_b (deltas from PEFT's own merges)."""
    base = world["base"]
    ref = copy.deepcopy(base)
    wa, wb = _peft_merged(world["peft"]["a"]).state_dict(), _peft_merged(world["peft"]["b"]).state_dict()
    with torch.no_grad():
        for k, p in ref.state_dict().items():
            p.add_(0.7 * (wa[k] - base.state_dict()[k]) - 0.3 * (wb[k] - base.state_dict()[k]))
    r = world["root"]
    model = bitengine.load(r / "fp16", dtype=torch.float32, adapters=[(r / "a", 0.7), f"{r / 'b'}:-0.3"])
    assert _rel(_logits(model, world["ids"]), _logits(ref, world["ids"])) < 1e-3
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert q.lora_A.shape == (4 + 2, 64) and q.lora_B.shape == (64, 6)  # one side path, ranks concatenated


# ---- ternary base ----------------------------------------------------------------------------

def _exact_lora_hooks(model, peft_models_weights):
    """Forward hooks adding sum_i w_i * scaling_i * (x A_i^T) B_i^T in float64 (the reference LoRA)."""
    handles = []
    for pm, weight in peft_models_weights:
        for name, mod in pm.named_modules():
            if not hasattr(mod, "lora_A") or "default" not in getattr(mod, "lora_A", {}):
                continue
            target = model.get_submodule(name.removeprefix("base_model.model."))
            a = mod.lora_A["default"].weight.detach().double()
            b = mod.lora_B["default"].weight.detach().double()
            s = mod.scaling["default"] * weight
            handles.append(target.register_forward_hook(
                lambda m, inp, out, a=a, b=b, s=s: out + s * ((inp[0] @ a.T) @ b.T)))
    return handles


def test_ternary_fused_matches_exact_lora(world):
    r = world["root"]
    ref = bitengine.load(r / "tern", dtype=torch.float64, backend="reference")
    _exact_lora_hooks(ref, [(world["peft"]["a"], 0.7), (world["peft"]["b"], 1.5)])
    model = bitengine.load(r / "tern", dtype=torch.float64, backend="reference", adapters=[(r / "a", 0.7), (r / "b", 1.5)])
    assert _rel(_logits(model, world["ids"]), _logits(ref, world["ids"])) < 1e-3
    # the default (auto: C++ when built) backend in float32 agrees with the reference backend
    fast = bitengine.load(r / "tern", dtype=torch.float32, adapters=[(r / "a", 0.7), (r / "b", 1.5)])
    assert _rel(_logits(fast, world["ids"]), _logits(model, world["ids"])) < 2e-2


def test_convert_with_adapter_is_quantize_of_merge(world, tmp_path):
    """convert(base, adapters=[a]) == convert(PEFT-merged base): packed codes, scales and logits bit-identical."""
    r = world["root"]
    _peft_merged(world["peft"]["a"]).save_pretrained(str(tmp_path / "merged_hf"))
    for scale in ("tensor", "channel"):
        bitengine.convert(r / "hf", tmp_path / f"conv_{scale}", scale=scale, adapters=[r / "a"], progress=False)
        bitengine.convert(tmp_path / "merged_hf", tmp_path / f"ref_{scale}", scale=scale, progress=False)
        got, ref = CheckpointReader(tmp_path / f"conv_{scale}"), CheckpointReader(tmp_path / f"ref_{scale}")
        assert set(got.index) == set(ref.index)
        for name in ref.index:
            assert torch.equal(got.tensor(name), ref.tensor(name)), name
    merged_q = _peft_merged(world["peft"]["a"]).model.layers[1].mlp.up_proj.weight.detach()
    w_q, s = absmean_quantize(merged_q, "channel")
    assert torch.equal(got.tensor("model.layers.1.mlp.up_proj.weight_packed"), pack_ternary(w_q))
    assert torch.equal(got.tensor("model.layers.1.mlp.up_proj.weight_scale"), s)
    ids = world["ids"]
    a = bitengine.load(tmp_path / "conv_channel", dtype=torch.float64, backend="reference")
    b = bitengine.load(tmp_path / "ref_channel", dtype=torch.float64, backend="reference")
    assert torch.equal(_logits(a, ids), _logits(b, ids))
    hook = merge_hook([r / "b"], a.config)
    w = torch.randn(64, 64)
    assert torch.equal(hook("model.layers.0.mlp.gate_proj", w), w)  # untargeted: unchanged
    _peft_adapter(world["base"], tmp_path / "head", target_modules=["lm_head"])
    with pytest.raises(AdapterError, match="lm_head"):  # convert does not route the head through the hook
        merge_hook([tmp_path / "head"], a.config)


def test_merge_mode_reports_survival_and_undoes(world):
    r = world["root"]
    model = bitengine.load(r / "tern_g", dtype=torch.float64, backend="reference")
    layer = model.get_submodule("model.layers.0.mlp.up_proj")
    packed0, scale0 = layer.weight_packed, layer.weight_scale
    base = _logits(model, world["ids"])
    rep = apply_adapters(model, [r / "a"], mode="merge")
    lg = rep["logits"]
    assert lg["adapter_effect"] > 1e-2 and -0.5 < lg["survival"] <= 1.5
    assert 0 < rep["codes_flipped"] < 0.5 and layer.weight_scale.shape == scale0.shape
    assert not torch.equal(layer.weight_packed, packed0)
    probe = _probe_ids(model)
    merged = _logits(model, probe)
    remove_adapters(model)
    assert lg["applied_effect"] == pytest.approx(_rel(merged, _logits(model, probe)), rel=1e-6)
    assert layer.weight_packed is packed0 and layer.weight_scale is scale0
    assert torch.equal(_logits(model, world["ids"]), base)
    # a zero delta leaves every code as it was (grid re-rounding keeps the scale)
    model2 = bitengine.load(r / "tern_g", dtype=torch.float64, backend="reference", adapters=[(r / "a", 0.0)],
                            adapter_mode="merge")
    assert torch.equal(model2.get_submodule("model.layers.0.mlp.up_proj").weight_packed, packed0)
    # fp16 base: merge is exact
    dense = bitengine.load(r / "fp16", dtype=torch.float32, adapters=[r / "a"], adapter_mode="merge")
    assert _rel(_logits(dense, world["ids"]), _logits(_peft_merged(world["peft"]["a"]), world["ids"])) < 1e-3


def test_switch_and_remove_restore_exactly(world):
    r, ids = world["root"], world["ids"]
    model = bitengine.load(r / "tern")
    base = _logits(model, ids)
    only_b = _logits(bitengine.load(r / "tern", adapters=[r / "b"]), ids)
    apply_adapters(model, [r / "a"])
    with_a = _logits(model, ids)
    assert not torch.equal(with_a, base)
    set_adapters(model, [r / "b"])
    assert torch.equal(_logits(model, ids), only_b)
    set_adapters(model, [r / "a"], mode="merge")
    set_adapters(model, [r / "a"], mode="merge")  # re-merge starts from the base, not from the merged weights
    merged = _logits(model, ids)
    set_adapters(model, [r / "a"], mode="fused")
    assert torch.equal(_logits(model, ids), with_a)
    set_adapters(model, [r / "a"], mode="merge")
    assert torch.equal(_logits(model, ids), merged)
    remove_adapters(model)
    assert torch.equal(_logits(model, ids), base)
    assert model.lora_state is None


def test_int8_factors(world):
    r = world["root"]
    model = bitengine.load(r / "fp16", dtype=torch.float32)
    rep = apply_adapters(model, [r / "a", r / "b"], adapter_dtype="int8")
    fp = apply_adapters(copy.deepcopy(model), [r / "a", r / "b"])
    assert rep["adapter_bytes"] < 0.3 * fp["adapter_bytes"]  # int8 vs fp32 factors (+ r_total scales each)
    assert rep["int8_factor_error_max"] < 0.03  # per side path, on Gaussian inputs
    assert rep["logits"]["error_vs_effect"] < 0.02  # int8 rounding costs < 2% of what the adapter does
    q = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert q.lora_A.dtype == torch.int8 and q.lora_B_scale.shape == (6,)


# ---- bad adapters: one-line errors, base untouched -------------------------------------------

def _edit_config(folder, **changes):
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))


def _bad_adapters(world, tmp):
    r = world["root"]
    cases = {}
    _peft_adapter(_hf_llama(hidden=96), tmp / "wide", seed=4)
    cases["shape"] = (tmp / "wide", "do not fit")
    _peft_adapter(_hf_llama(layers=3), tmp / "deep", seed=4)
    cases["wrong_base_layers"] = (tmp / "deep", "which this model does not have")
    shutil.copytree(r / "a", tmp / "noweights")
    (tmp / "noweights/adapter_model.safetensors").unlink()
    cases["missing_weights"] = (tmp / "noweights", "no adapter_model.safetensors")
    cases["missing_dir"] = (tmp / "nowhere", "not found")
    for name, change, msg in [
        ("unknown_targets", {"target_modules": ["w1", "w2"]}, "matches no linear layer"),
        ("dora", {"use_dora": True}, "DoRA"),
        ("modules_to_save", {"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ("bias", {"bias": "all"}, "bias"),
        ("rank", {"r": 3}, "r=3"),
        ("fewer_targets", {"target_modules": ["q_proj"]}, "does not select"),
        ("embedding", {"target_modules": ["q_proj", "embed_tokens"]}, "not a linear layer"),
        ("unknown_field", {"use_magic": True}, "unknown field"),
    ]:
        shutil.copytree(r / "a", tmp / name)
        _edit_config(tmp / name, **change)
        cases[name] = (tmp / name, msg)
    return cases


def test_bad_adapters_leave_model_untouched(world, tmp_path):
    r, ids = world["root"], world["ids"]
    model = bitengine.load(r / "tern")
    apply_adapters(model, [r / "b"], mode="merge")  # a current adapter that a failed switch must keep
    before = _logits(model, ids)
    state = model.lora_state
    for name, (folder, msg) in _bad_adapters(world, tmp_path).items():
        for mode in ("fused", "merge"):
            with pytest.raises((AdapterError, FileNotFoundError)) as e:
                set_adapters(model, [r / "a", folder], mode=mode)
            assert msg in str(e.value) and "\n" not in str(e.value), (name, str(e.value))
            assert model.lora_state is state and torch.equal(_logits(model, ids), before), name
    with pytest.raises(AdapterError, match="target_modules"):
        bitengine.convert(r / "hf", tmp_path / "never", adapters=[tmp_path / "unknown_targets"], progress=False)
    assert not (tmp_path / "never").exists()


def test_parse_adapter_arg(tmp_path):
    assert parse_adapter_arg("my/lora") == ("my/lora", 1.0)
    assert parse_adapter_arg("my/lora:0.5") == ("my/lora", 0.5)
    assert parse_adapter_arg("my/lora:-2") == ("my/lora", -2.0)
    odd = tmp_path / "a:b"
    odd.mkdir()
    assert parse_adapter_arg(str(odd)) == (str(odd), 1.0)
    with pytest.raises(AdapterError, match="WEIGHT"):
        parse_adapter_arg("my/lora:heavy")
