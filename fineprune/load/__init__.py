"""Loading an untrusted model: structural checks without Keras, then a safe-mode load."""
