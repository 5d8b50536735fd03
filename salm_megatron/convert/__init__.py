"""Checkpoint conversion: Hugging Face LLMs <-> our Megatron checkpoints, public encoders in,
whole-model export/import. ``salm convert --help`` lists the conversions."""
