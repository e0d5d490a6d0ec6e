"""Turning a trained run into something to ship: LoRA merge (``merge``) and GGUF files (``gguf``)."""
