"""Training: keyed (or plain) fine-tuning of a timm ViT from a base checkpoint, full or LoRA, on one
CPU, one GPU or many (torchrun). Imports only the core. See ``docs/architecture.md``."""
