"""A randomly initialised LLaMA-2-7B-shaped model (fp16) and random calibration tokens, for
speed measurements where the weights' values do not matter (no download, no tokenizer).

    python bench/studies/random_model.py --out /tmp/llama2-7b-random [--layers 32]

Writes a Hugging Face folder and `calib.pt` ([4, 128] token ids) next to its config.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers

LLAMA2_7B = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--layers", type=int, default=32)
    args = ap.parse_args()
    config = transformers.LlamaConfig(num_hidden_layers=args.layers, **LLAMA2_7B)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of minutes on the CPU
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float16)
    model.save_pretrained(args.out)
    torch.save(torch.randint(0, config.vocab_size, (4, 128)), args.out / "calib.pt")
    print(f"saved a random {args.layers}-layer LLaMA-2-7B-shaped fp16 model to {args.out}")


if __name__ == "__main__":
    main()
