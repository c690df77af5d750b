"""LoRA / QLoRA through qwix on tiny checkpoints of every family (built with transformers at test time):
B = 0 is the base; the adapted model equals its merged weights, in our decoder, through FIPO's loss and in
transformers after the HF export; PEFT's format out (loaded by `peft` on the HF base, same logits) and
back; only adapters get gradients; QLoRA within its quantization's tolerance; bad inputs in one line."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx  # noqa: E402

from fipo_jax.core.losses import PolicyLossConfig, policy_loss  # noqa: E402
from fipo_jax.generation.logprobs import sequence_log_probs  # noqa: E402
from fipo_jax.models import CausalLM, load_pretrained, save_pretrained  # noqa: E402
from fipo_jax.models.lora import (  # noqa: E402
    LoraConfig,
    adapter_variables,
    adapters_off,
    apply_lora,
    base_digest,
    layer_projections,
    merge_lora,
)
from fipo_jax.models.peft_io import PeftAdapterError, load_peft_adapters, save_peft_adapters  # noqa: E402
from fipo_jax.models.weights import params_digest  # noqa: E402

VOCAB = 64
FAMILIES = {
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {}),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, dict(head_dim=16, tie_word_embeddings=False)),
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(mlp_bias=True, attention_bias=True)),
    "gemma3_text": (transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM,
                    dict(head_dim=8, sliding_window=4, sliding_window_pattern=2, query_pre_attn_scalar=8)),
}


def write_family(path, family: str, seed: int = 0) -> str:
    config_cls, model_cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    config = config_cls(**{**dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                  initializer_range=0.2, tie_word_embeddings=True), **extra})
    model_cls(config).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family_folder(request, tmp_path_factory):
    return request.param, write_family(tmp_path_factory.mktemp(f"lora_{request.param}"), request.param)


@pytest.fixture(scope="module")
def gemma_folder(tmp_path_factory):
    """The family with the most switches (sliding window, sandwich norms, GeGLU) for the family-blind checks."""
    return "gemma3_text", write_family(tmp_path_factory.mktemp("lora_gemma"), "gemma3_text")


IDS = np.random.default_rng(0).integers(0, VOCAB, (2, 7))


def randomise_adapters(model, scale: float = 0.3, seed: int = 1) -> None:
    """B ≠ 0 (qwix starts it at 0), so that the adapters change what the model computes."""
    key = jax.random.key(seed)
    for i, projection in enumerate(layer_projections(model.layers).values()):
        a, b = adapter_variables(projection)
        b.set_value(scale * jax.random.normal(jax.random.fold_in(key, i), b.shape, b.get_value().dtype))


def test_zero_b_is_the_base_and_the_merge_is_the_adapted_model(family_folder):
    family, folder = family_folder
    model = load_pretrained(folder)
    base = np.asarray(model(jnp.asarray(IDS)))
    apply_lora(model, LoraConfig(rank=4, alpha=8.0))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(IDS))), base, atol=1e-6)
    randomise_adapters(model)
    adapted = np.asarray(model(jnp.asarray(IDS)))
    assert np.abs(adapted - base).max() > 0.05  # the adapters do something
    np.testing.assert_allclose(np.asarray(merge_lora(model)(jnp.asarray(IDS))), adapted, atol=2e-5)


def test_merged_export_and_peft_adapters_load_in_transformers_and_peft(family_folder, tmp_path):
    import peft

    family, folder = family_folder
    model = apply_lora(load_pretrained(folder), LoraConfig(rank=4, alpha=8.0))
    randomise_adapters(model)
    ours = np.asarray(model(jnp.asarray(IDS)))
    save_pretrained(merge_lora(model), tmp_path / "merged")
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        np.testing.assert_allclose(merged(torch.as_tensor(IDS)).logits.numpy(), ours, atol=1e-4)
    save_peft_adapters(model, tmp_path / "adapters", base_model_name_or_path=folder)
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf_base, tmp_path / "adapters")(torch.as_tensor(IDS)).logits.numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4)
    back = load_peft_adapters(load_pretrained(folder), tmp_path / "adapters")
    np.testing.assert_allclose(np.asarray(back(jnp.asarray(IDS))), ours, atol=1e-6)
    assert base_digest(back) == base_digest(model) == params_digest(load_pretrained(folder))


def _fipo_loss(model, old_lp, advantages, mask):
    lp = sequence_log_probs(model, jnp.asarray(IDS))
    return policy_loss(lp, old_lp, advantages, mask, PolicyLossConfig())


def test_fipo_loss_and_metrics_through_adapters_equal_the_merged_model(gemma_folder):
    family, folder = gemma_folder
    model = apply_lora(load_pretrained(folder), LoraConfig(rank=4, alpha=8.0))
    randomise_adapters(model)
    old_lp = sequence_log_probs(load_pretrained(folder), jnp.asarray(IDS))  # π_old: the base
    advantages = jnp.asarray([1.0, -1.0])
    mask = jnp.ones(old_lp.shape, jnp.bool_)
    loss, metrics = _fipo_loss(model, old_lp, advantages, mask)
    merged_loss, merged_metrics = _fipo_loss(merge_lora(model), old_lp, advantages, mask)
    np.testing.assert_allclose(float(loss), float(merged_loss), rtol=1e-5, atol=1e-6)
    for name in metrics:
        np.testing.assert_allclose(np.asarray(metrics[name]), np.asarray(merged_metrics[name]), rtol=1e-4,
                                   atol=1e-5, err_msg=name)


def test_only_the_adapters_get_gradients_and_switched_off_they_give_the_base(gemma_folder):
    family, folder = gemma_folder
    model = apply_lora(load_pretrained(folder), LoraConfig(rank=4, alpha=8.0))
    randomise_adapters(model)
    graphdef, adapters, frozen = nnx.split(model, nnx.LoRAParam, ...)

    def loss(adapters):
        return -jnp.mean(sequence_log_probs(nnx.merge(graphdef, adapters, frozen), jnp.asarray(IDS)))

    reference = nnx.merge(graphdef, adapters_off(adapters), frozen)  # a KL term's reference: the base itself
    np.testing.assert_allclose(np.asarray(reference(jnp.asarray(IDS))),
                               np.asarray(load_pretrained(folder)(jnp.asarray(IDS))), atol=1e-6)
    assert float(np.abs(np.asarray(nnx.merge(graphdef, adapters, frozen)(jnp.asarray(IDS)))
                        - np.asarray(reference(jnp.asarray(IDS)))).max()) > 0.05
    grads = jax.grad(loss)(adapters)
    leaves = jax.tree.leaves(grads)
    assert len(leaves) == 2 * 7 and all(np.isfinite(np.asarray(g)).all() for g in leaves)
    b_grads = [g for path, g in nnx.to_flat_state(grads) if path[-1] == "kernel_lora_b"]
    assert all(float(jnp.abs(g.get_value()).max()) > 0 for g in b_grads)
    assert not any(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(frozen))


# What each quantizer promises (qwix: one scale per output channel, the absmax over the input dim):
# |Ŵ − W| ≤ tolerance × max|W| of the channel. Symmetric int: half a step, 0.5 / qmax. NF4: half the
# widest gap between its 16 levels (−1.0 → −0.6962).
QLORA_TOLERANCE = {"int8": 0.5 / 127, "int4": 0.5 / 7, "nf4": (1.0 - 0.6962) / 2}


@pytest.mark.parametrize("base_dtype", sorted(QLORA_TOLERANCE))
def test_qlora_holds_the_base_within_its_quantization_tolerance(gemma_folder, base_dtype):
    from fipo_jax.models.lora import base_kernel

    family, folder = gemma_folder
    model = load_pretrained(folder)
    plain = {path: np.asarray(p.kernel.get_value()).reshape(p.kernel.shape[0], -1, int(np.prod(p.out_shape)))
             for path, p in layer_projections(model.layers).items()}
    base = np.asarray(model(jnp.asarray(IDS)))
    apply_lora(model, LoraConfig(rank=4, alpha=8.0, base_dtype=base_dtype))
    quantized = [path for path, v in nnx.to_flat_state(nnx.state(model)) if "qvalue" in map(str, path)]
    assert len(quantized) == 7  # every projection of the stacked layer
    for path, projection in layer_projections(model.layers).items():
        error = np.abs(np.asarray(base_kernel(projection)) - plain[path])
        bound = QLORA_TOLERANCE[base_dtype] * np.abs(plain[path]).max(axis=1, keepdims=True) + 1e-6
        assert (error <= bound).all(), (path, float((error / bound).max()))
    assert float(np.abs(np.asarray(model(jnp.asarray(IDS))) - base).max()) > 0  # it is quantized
    randomise_adapters(model)
    np.testing.assert_allclose(np.asarray(merge_lora(model)(jnp.asarray(IDS))), np.asarray(model(jnp.asarray(IDS))),
                               atol=2e-5)


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def qwen_folder(tmp_path_factory):
    return write_family(tmp_path_factory.mktemp("lora_bad"), "qwen2")


@pytest.mark.parametrize("lora, message", [
    (LoraConfig(module_path="self_attn/qkv"), r"matches no projection of a decoder layer \(paths: self_attn/q_proj"),
    (LoraConfig(rank=17), r"lora.rank 17 exceeds self_attn/k_proj's smaller side 16 \(\[32, 16\]\)"),
])
def test_bad_settings_fail_in_one_line_and_leave_the_model_alone(qwen_folder, lora, message):
    model = load_pretrained(qwen_folder)
    digest = params_digest(model)
    with pytest.raises(ValueError, match=message):
        apply_lora(model, lora)
    assert params_digest(model) == digest and getattr(model, "lora", None) is None


@pytest.mark.parametrize("lora, message", [
    (dict(rank=0), "lora.rank must be"), (dict(alpha=0.0), "lora.alpha must be > 0"),
    (dict(base_dtype="int3"), "lora.base_dtype"), (dict(module_path="("), "not a regular expression"),
    (dict(dropout=0.1), r"lora.dropout 0.1 is not supported yet"),
])
def test_bad_config_values_are_refused(lora, message):
    with pytest.raises(ValueError, match=message):
        LoraConfig(**lora)


def test_adapting_twice_is_refused(qwen_folder):
    model = apply_lora(load_pretrained(qwen_folder), LoraConfig(rank=2))
    with pytest.raises(ValueError, match="already has adapters"):
        apply_lora(model, LoraConfig(rank=2))


def test_a_peft_folder_of_another_base_is_refused_and_nothing_loaded(qwen_folder, tmp_path):
    model = apply_lora(load_pretrained(qwen_folder), LoraConfig(rank=2))
    save_peft_adapters(model, tmp_path / "adapters")
    other = load_pretrained(write_family(tmp_path / "other", "qwen2", seed=1))  # same shapes, other weights
    digest = params_digest(other)
    with pytest.raises(PeftAdapterError, match=r"holds adapters of another base \(sha256 [0-9a-f]{16}…"):
        load_peft_adapters(other, tmp_path / "adapters")
    assert params_digest(other) == digest and getattr(other, "lora", None) is None
    from safetensors.numpy import load_file, save_file

    weights = tmp_path / "adapters" / "adapter_model.safetensors"
    save_file(load_file(weights), weights, metadata={"format": "pt"})  # as a PEFT folder from elsewhere
    with pytest.raises(PeftAdapterError, match=r"does not fit this base"):
        load_peft_adapters(CausalLM(dataclasses.replace(model.config, intermediate_size=40), rngs=nnx.Rngs(0)),
                           tmp_path / "adapters")
    with pytest.raises(PeftAdapterError, match="is not a PEFT adapter folder"):
        load_peft_adapters(load_pretrained(qwen_folder), tmp_path)


def test_adapters_on_a_gguf_base_load_in_peft_on_transformers_gguf_loading(tmp_path):
    """The GGUF loading path: a Q8_0 file's dequantised model adapted, its PEFT adapters on transformers'
    own loading of the same file give our logits."""
    import gguf
    import peft

    from tests.gguf_writer import write_gguf
    from tests.test_gguf import hf_gguf, tiny

    path = write_gguf(tiny("qwen2"), tmp_path / "qwen2.gguf", "qwen2", gguf.GGMLQuantizationType.Q8_0)
    model = load_pretrained(path)
    base = np.asarray(model(jnp.asarray(IDS)))
    apply_lora(model, LoraConfig(rank=4, alpha=8.0))
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(IDS))), base, atol=1e-6)
    randomise_adapters(model)
    save_peft_adapters(model, tmp_path / "adapters")
    with torch.no_grad():
        theirs = peft.PeftModel.from_pretrained(hf_gguf(path), tmp_path / "adapters")(torch.as_tensor(IDS)).logits
    np.testing.assert_allclose(theirs.numpy(), np.asarray(model(jnp.asarray(IDS))), atol=1e-4)
