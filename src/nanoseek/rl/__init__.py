"""Post-training: SFT and GRPO with rule-checked rewards (DeepSeek-R1-Zero style)."""
