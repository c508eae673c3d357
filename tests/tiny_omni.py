"""Tiny *full* Qwen-Omni checkpoints: the layout real Omni releases ship, around a tiny thinker.

Real Qwen2.5-Omni / Qwen3-Omni checkpoints hold the whole model: config.json is the full config
(`Qwen2_5OmniConfig` / `Qwen3OmniMoeConfig`, the thinker's under `thinker_config`), the weights are
sharded safetensors named `thinker.*`, `talker.*` and `token2wav.*` (Qwen2.5) or `code2wav.*`
(Qwen3), and Qwen2.5-Omni ships its speaker table `spk_dict.pt` beside them. The thinker here is the
tiny thinker of tiny_multimodal.py; the talker and vocoder are a few random tensors in several
dtypes under plausible names (nothing builds them: slimc copies them byte for byte). The thinker
class loads such a directory (`from_pretrained` picks `thinker_config` and strips `thinker.`).
Qwen3-Omni *Thinking* releases are the same without talker and code2wav weights (`talker=False`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from tiny_multimodal import save_tiny_multimodal, tiny_multimodal_model
from transformers.core_model_loading import revert_weight_conversion

# kind -> (full config class, architecture the release's config.json names, vocoder prefix)
FULL_OMNI = {
    "qwen2_5_omni": ("Qwen2_5OmniConfig", "Qwen2_5OmniModel", "token2wav"),
    "qwen3_omni_moe": ("Qwen3OmniMoeConfig", "Qwen3OmniMoeForConditionalGeneration", "code2wav"),
}
SPEAKER_FILE = "spk_dict.pt"


def speech_tensors(kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Stand-ins for the talker and vocoder weights: names like the releases', bfloat16 and float32 mixed."""
    generator = torch.Generator().manual_seed(seed + 7)
    vocoder = FULL_OMNI[kind][2]

    def random(*shape: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    return {
        "talker.model.embed_tokens.weight": random(96, 32),
        "talker.model.layers.0.self_attn.q_proj.weight": random(32, 32),
        "talker.model.layers.0.self_attn.q_proj.bias": random(32),
        "talker.model.layers.0.mlp.down_proj.weight": random(32, 48),
        "talker.model.norm.weight": random(32, dtype=torch.float32),
        "talker.codec_head.weight": random(96, 32),
        f"{vocoder}.decoder.0.conv.weight": random(16, 8, 3, dtype=torch.float32),
        f"{vocoder}.decoder.0.conv.bias": random(16, dtype=torch.float32),
        f"{vocoder}.upsample.1.alpha": random(1, 16, 1),
    }


def save_tiny_full_omni(kind: str, directory: str | Path, *, seed: int = 0, talker: bool = True,
                        dtype: torch.dtype = torch.float32) -> Path:
    """A full Omni checkpoint directory: full config, `thinker.*` (+ talker/vocoder) in two shards with an
    index, tokenizer and processor files, and (Qwen2.5) a speaker file.

    `talker=False` gives the Qwen3-Omni Thinking layout: thinker weights only, `enable_audio_output` false.
    """
    directory = Path(directory)
    save_tiny_multimodal(kind, directory, seed=seed)  # tokenizer and processor files (and a thinker-only model)
    for name in ("model.safetensors", "config.json"):
        (directory / name).unlink()
    thinker = tiny_multimodal_model(kind, seed=seed, dtype=dtype)
    state = revert_weight_conversion(thinker, thinker.state_dict())
    tensors = {f"thinker.{name}": t.contiguous() for name, t in state.items()}
    if talker:
        tensors.update(speech_tensors(kind, seed))
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for file, shard in shards.items():
        save_file({n: tensors[n] for n in shard}, directory / file, metadata={"format": "pt"})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": {n: f for f, shard in shards.items() for n in shard}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config_class, architecture, _ = FULL_OMNI[kind]
    thinker_config = thinker.config.to_dict()
    thinker_config.pop("_experts_implementation", None)
    dtype_name = str(dtype).removeprefix("torch.")
    thinker_config["dtype"] = dtype_name
    # The full config classes default to bfloat16 (the releases' dtype); say the tiny thinker's.
    config = getattr(transformers, config_class)(thinker_config=thinker_config, enable_audio_output=talker,
                                                 architectures=[architecture], dtype=dtype_name)
    config.save_pretrained(directory)
    if kind == "qwen2_5_omni":
        (directory / SPEAKER_FILE).write_bytes(bytes(range(256)) * 4)  # opaque to slimc: copied, never read
    return directory
