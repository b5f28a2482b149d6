"""Vision chat: LLaVA-style vision encoder + projector + causal LM."""
