"""Interoperability: original MiniMind-V checkpoints and Hugging Face exports."""
