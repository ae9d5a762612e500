"""Builds a tiny random-weight Llama, a locally trained tokenizer and peft LoRA adapters (offline)."""
import json
import os
import sys

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from peft import LoraConfig, get_peft_model

out = sys.argv[1]
base = os.path.join(out, "tiny-llama")
os.makedirs(base, exist_ok=True)
torch.manual_seed(0)

corpus = ["the food was great and the service was slow", "ski resorts open in winter",
          "a movie review: the plot was thin", "hello world, how are you today?"] * 50
tok = Tokenizer(models.BPE(unk_token="<unk>"))
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"],
                                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
fast.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
fast.save_pretrained(base)

# Two heads: a head size of 32 (vLLM 0.32's CPU attention supports 32 and up, not 16).
cfg = LlamaConfig(vocab_size=len(fast), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
model = LlamaForCausalLM(cfg)
model.save_pretrained(base, safe_serialization=True)

for name, rank in [("a1", 8), ("a2", 8), ("too-big", 16)]:
    m = LlamaForCausalLM.from_pretrained(base)
    peft = get_peft_model(m, LoraConfig(r=rank, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    peft.save_pretrained(os.path.join(out, name))
print(json.dumps({"base": base, "adapters": ["a1", "a2", "too-big"]}))
