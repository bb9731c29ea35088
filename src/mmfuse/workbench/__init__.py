"""The fusion workbench: compare fusions on your data, stress them, explain their predictions."""
