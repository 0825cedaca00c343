"""Models shipped with piscis: one folder per model (safetensors weights, JSON config, card)."""
