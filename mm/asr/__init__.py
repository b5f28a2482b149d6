"""Whisper-style speech recognition: log-mel front end, tokenizer, encoder-decoder model, decoding."""
