"""Ray Train loops (SEATER, SASRec), checkpoints, early stopping."""
