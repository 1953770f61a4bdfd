"""The study: attacks and defenses on real traffic signs, through the engine's own code."""
