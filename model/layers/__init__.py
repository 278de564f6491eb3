"""Jamba's building blocks: RMSNorm, the Mamba mixer, GQA attention, the MoE and dense feed-forwards."""
