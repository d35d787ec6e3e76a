"""Surfaces over the generation engine: terminal chat, the OpenAI-compatible API server, the Gradio web demo."""
