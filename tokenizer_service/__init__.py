"""Tokenizer service (:8101) and our tokenizer server speaking the card's protocol."""
