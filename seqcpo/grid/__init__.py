"""``seqcpo reproduce``: a grid of arms (train, generate, evaluate), its controls and curves, and one report."""
