"""Training-pair synthesis for cascade-vsr: flow-based, model-guided and classic degradations."""
