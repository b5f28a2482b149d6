"""CLIP: open_clip models, our checkpoint/export format, and zero-shot / retrieval evaluation."""
