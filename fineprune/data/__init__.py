"""Data: safe .npz reading, samples checked against the model, honest splits."""
