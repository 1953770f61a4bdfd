"""Pruning: the layer graph, the channels a cut reaches, the sweep over k, the surgery."""
