"""The LightningModules: ``TransActLM`` (the model being pruned, trained back on next-token loss) and
``DistillationLM`` (the same, trained back by distillation from the dense teacher)."""
