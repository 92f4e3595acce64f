"""SEATER model, losses, constrained beam search, retriever; SASRec."""
