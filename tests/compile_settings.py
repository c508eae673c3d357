"""Compiling the tiny models with the shipped configs: the `--set` overrides that make a compile take seconds,
per family, shared by each family's tests and the export formats' tests."""

from __future__ import annotations

# Decoder LLMs: 2 batches of 2 samples, 32 tokens each.
SMALL_CALIBRATION = ["calibration.samples=4", "calibration.seq_len=32", "calibration.batch_size=2"]
VLLM_ONLY = ["export=[{format: vllm}]"]

MULTIMODAL_CONFIGS = {"qwen2_5_vl": "qwen2_5_vl/w8a8.yaml", "qwen3_vl": "qwen3_vl/w8a8.yaml",
                      "qwen3_vl_moe": "qwen3_vl_moe/w8a8.yaml", "glm4v_moe": "glm4v_moe/w8a8.yaml"}
# Small calibration: 8 samples of the built-in image–text set, 2 to a batch, 56-pixel images (the tiny
# processors turn any image into 8 x 8 patches, 16 image tokens).
MULTIMODAL_SMALL = ["calibration.samples=8", "calibration.batch_size=2", "calibration.image_size=56", "calibration.seq_len=64"]

OMNI_IMAGE_SIZE = {"qwen2_5_omni": 112, "qwen3_omni_moe": 128}  # 8 x 8 patches, as tiny_multimodal_inputs makes them
# Small calibration: 2 batches of 2 samples, each an image, a 1-second clip and text; a 2-point smoothing search.
OMNI_SMALL = ["calibration.samples=4", "calibration.batch_size=2", "calibration.seq_len=256", "calibration.audio_seconds=1",
              "pipeline.0.search_grid=[0.5, 0.8]"]

# Tiny pipelines: 32x32 images (64 image tokens) / 64x64 5-frame videos (32 tokens), 4 prompts, 16 text
# tokens, 2 steps (Wan2.2: one per expert), one smoothing alpha instead of the searched grid. Fewer image
# tokens than the Linears' input sizes (128 in the MLPs) would leave GPTQ's Hessians and the rotation
# search fitted to a few tokens, unlike any real calibration.
DIFFUSION_SMALL = ["calibration.samples=4", "calibration.diffusion.steps=2", "calibration.diffusion.max_sequence_length=16",
                   "pipeline.0.search_grid=[0.5]"]
DIFFUSION_SIZES = {
    "flux": ["calibration.diffusion.height=32", "calibration.diffusion.width=32"],
    "hunyuan_video": ["calibration.diffusion.height=64", "calibration.diffusion.width=64", "calibration.diffusion.frames=5"],
    "wan": ["calibration.diffusion.height=64", "calibration.diffusion.width=64", "calibration.diffusion.frames=5"],
}
