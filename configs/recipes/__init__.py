"""Continual-pretraining recipes as stage chains (README: "Continual-pretraining recipes")."""
