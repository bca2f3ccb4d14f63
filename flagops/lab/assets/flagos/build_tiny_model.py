"""Build the lab's tiny ERNIE-4.5 MoE checkpoint (runs inside the lab FlagOS image).

    python build_tiny_model.py OUT_DIR

Random weights, fixed seeds: the same image always writes the same bytes. The layout is the
real checkpoint's (``Ernie4_5_MoeForCausalLM``, per-expert tensors, several safetensors shards
plus ``model.safetensors.index.json``), scaled down to sizes vLLM's CPU kernels accept:
head_dim 32 (CPU attention supports 32..512), hidden and MoE intermediate sizes multiples of 32
(CPUUnquantizedExperts aligns outputs to 32). Four decoder layers, so each of two pipeline
stages holds two: layer 0 dense (like the real model's early dense layers), layers 1-3 MoE with
8 experts, top-2 and one shared expert.
"""

from __future__ import annotations

import glob
import json
import os
import sys

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # tokenizer training: one thread, one result
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import (  # noqa: E402
    Ernie4_5_MoeConfig,
    Ernie4_5_MoeForCausalLM,
    GenerationConfig,
    PreTrainedTokenizerFast,
)

SEED = 4_5_0  # ERNIE-4.5, 0
VOCAB = 1024
SPECIALS = ["<unk>", "<s>", "</s>", "<|begin_of_sentence|>", "<|end_of_sentence|>"]
# ERNIE-4.5's chat format: <|begin_of_sentence|>[system\n]User: ...\nAssistant: ...<|end_of_sentence|>
CHAT_TEMPLATE = (
    "{{- '<|begin_of_sentence|>' -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- message['content'] + '\\n' -}}"
    "{%- elif message['role'] == 'user' -%}{{- 'User: ' + message['content'] + '\\n' -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- 'Assistant: ' + message['content'] + '<|end_of_sentence|>' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant: ' -}}{%- endif -%}"
)
SHARD = "1MB"  # forces several shards (the real checkpoint has many)


def corpus() -> list[str]:
    """Training text for the BPE: the image's Python stdlib sources, in a fixed order."""
    texts = []
    for name in sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py"))):
        with open(name, encoding="utf-8", errors="replace") as handle:
            texts.append(handle.read())
    return texts


def build_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        min_frequency=2,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte: never an <unk>
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<|begin_of_sentence|>", "<|end_of_sentence|>"],
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_config() -> Ernie4_5_MoeConfig:
    return Ernie4_5_MoeConfig(
        vocab_size=VOCAB,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        hidden_act="silu",
        max_position_embeddings=512,
        moe_intermediate_size=64,
        moe_num_experts=8,
        moe_k=2,
        moe_num_shared_experts=1,
        moe_layer_start_index=1,
        moe_layer_end_index=3,
        moe_layer_interval=1,
        rope_parameters={"rope_theta": 500000.0, "rope_type": "default"},
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        use_bias=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        architectures=["Ernie4_5_MoeForCausalLM"],
        dtype="float32",
    )


def main(out: str) -> None:
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    os.makedirs(out, exist_ok=True)

    tokenizer = build_tokenizer()
    assert len(tokenizer) == VOCAB, len(tokenizer)
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIALS] == list(range(len(SPECIALS)))
    tokenizer.save_pretrained(out)

    config = build_config()
    model = Ernie4_5_MoeForCausalLM(config).to(torch.float32).eval()
    # the router's score-correction bias starts at zero; give it values so routing is exercised
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("e_score_correction_bias"):
                param.copy_(torch.randn(param.shape) * 0.01)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=[2, 4], pad_token_id=0, do_sample=False)
    model.save_pretrained(out, max_shard_size=SHARD)

    with open(os.path.join(out, "model.safetensors.index.json")) as handle:
        index = json.load(handle)
    shards = sorted(set(index["weight_map"].values()))
    experts = [k for k in index["weight_map"] if ".mlp.experts." in k]
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"params": params, "shards": len(shards), "expert_tensors": len(experts)}))
    assert len(shards) >= 3, shards


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    main(sys.argv[1])
