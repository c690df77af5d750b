"""How far a QLoRA base moves the real Gemma 3 270M (the packaged GGUF, dequantised to float32): next-token
distributions of the model with its projections held int8 / int4 / nf4 by qwix (adapters at B = 0, so only
the quantization differs) against the float32 model, on word-problem prompts of the CPU preset.

    python experiments/qlora_fidelity.py --out qlora_fidelity.json

Per base type: mean KL(float32 ‖ quantized) over every position, the largest logit deviation, and how often
the most likely next token agrees.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from fipo_jax.config import load_config
from fipo_jax.models.lora import LoraConfig, apply_lora
from fipo_jax.parallel.sharding import make_mesh
from fipo_jax.train.build import build_model, build_prompts, build_tokenizer

# (base dtype, block size): the defaults (int8 one scale per output channel, 4-bit per 64 input rows), and
# int8 in blocks of 64 too.
VARIANTS = (("int8", None), ("int4", None), ("nf4", None), ("int8", 64))


def token_batch(config, tokenizer, rows: int) -> np.ndarray:
    """The first `rows` training prompts of the preset, tokenized and cut to the shortest one's length."""
    from fipo_jax.data.encoding import encode_prompt

    records, _ = build_prompts(config, tokenizer, lambda s: None)
    encoded = [encode_prompt(r, tokenizer) for r in records[:rows]]
    width = min(len(ids) for ids in encoded)
    return np.asarray([ids[:width] for ids in encoded], np.int32)


def compare(reference: np.ndarray, logits: np.ndarray) -> dict:
    log_p, log_q = jax.nn.log_softmax(reference), jax.nn.log_softmax(logits)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return {"mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
            "max_logit_deviation": float(np.abs(logits - reference).max()),
            "top1_agreement": float((reference.argmax(-1) == logits.argmax(-1)).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="qlora_fidelity.json")
    parser.add_argument("--rows", type=int, default=8)
    args = parser.parse_args()
    config = load_config("gemma3-270m-fipo")
    tokenizer = build_tokenizer(config)
    ids = jnp.asarray(token_batch(config, tokenizer, args.rows))
    forward = jax.jit(lambda model, ids: model(ids))
    reference = np.asarray(forward(build_model(config, tokenizer, make_mesh((1,)), print), ids))
    results = {"tokens": int(ids.size), "logit_range": float(np.abs(reference).max())}
    for base_dtype, block in VARIANTS:
        model = apply_lora(build_model(config, tokenizer, make_mesh((1,)), lambda s: None),
                           LoraConfig(rank=16, base_dtype=base_dtype, block_size=block))
        name = base_dtype + ("" if block is None else f" block {block}")
        results[name] = compare(reference, np.asarray(forward(model, ids)))
        print(name, json.dumps(results[name]), flush=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
